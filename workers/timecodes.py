"""Seconds <-> frame numbers. The one place that does this arithmetic.

Frame numbers are 1-based and inclusive, as FiftyOne's ``TemporalDetection.support`` and Label Studio's
timeline ``ranges`` use them: frame ``n`` is shown from ``(n-1)/fps`` to ``n/fps`` seconds, and a segment
``[start_s, end_s)`` covers frames ``first..last``. Every result is clamped to ``1..n_frames``.
"""

from __future__ import annotations

import math

# Times this close to a frame boundary count as on it (29.97 fps times do not land exactly).
_EPS = 1e-6


def _check(fps: float, n_frames: int) -> None:
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if n_frames < 1:
        raise ValueError(f"n_frames must be at least 1, got {n_frames!r}")


def frame_at(t: float, fps: float, n_frames: int) -> int:
    """The 1-based frame shown at time ``t`` seconds, clamped to the video."""
    _check(fps, n_frames)
    return min(max(math.floor(t * fps + _EPS) + 1, 1), n_frames)


def seconds_to_frames(start_s: float, end_s: float, fps: float, n_frames: int) -> tuple[int, int]:
    """The inclusive 1-based frame range ``(first, last)`` covering ``[start_s, end_s)``; never empty."""
    _check(fps, n_frames)
    first = frame_at(start_s, fps, n_frames)
    last = min(max(math.ceil(end_s * fps - _EPS), 1), n_frames)
    return first, max(first, last)


def frames_to_seconds(first: int, last: int, fps: float) -> tuple[float, float]:
    """``(start_s, end_s)`` of the inclusive 1-based frame range: from the start of ``first`` to the end of
    ``last``. ``seconds_to_frames`` of the result gives ``(first, last)`` back."""
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if first < 1 or last < first:
        raise ValueError(f"bad frame range ({first}, {last}): frames are 1-based and first <= last")
    return (first - 1) / fps, last / fps


def convert_frames(
    first: int, last: int, from_fps: float, to_fps: float, to_n_frames: int
) -> tuple[int, int]:
    """A frame range in one frame rate as the same span of time in another (e.g. a video's real fps to a
    Label Studio project's configured ``frameRate``), through seconds."""
    start_s, end_s = frames_to_seconds(first, last, from_fps)
    return seconds_to_frames(start_s, end_s, to_fps, to_n_frames)
