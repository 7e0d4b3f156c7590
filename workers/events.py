"""Events over time: windows over a video, and per-window probabilities -> merged segments.

windows(duration) -> [(start, end), ...]
probabilities per window -> smooth (moving average) -> hysteresis (enter >= high, stay >= low)
-> runs of windows -> one segment per run, scored by the mean probability over the run
"""

from __future__ import annotations

import numpy as np

from workers.schemas import Segment


def windows(duration: float, length: float, stride: float) -> list[tuple[float, float]]:
    """Windows of ``length`` seconds every ``stride`` seconds covering [0, duration]. The last window is
    shifted back to end at ``duration``; a video shorter than one window gets one window over all of it."""
    if length <= 0 or stride <= 0:
        raise ValueError(f"window length and stride must be positive, got {length}, {stride}")
    if duration <= length:
        return [(0.0, duration)]
    starts = list(np.arange(0.0, duration - length + 1e-9, stride))
    if starts[-1] + length < duration - 1e-9:
        starts.append(duration - length)
    return [(float(s), float(s) + length) for s in starts]


def smooth(probs: np.ndarray, width: int) -> np.ndarray:
    """Centred moving average over ``width`` windows (odd; 1 = none), edges averaged over what exists."""
    if width <= 1:
        return probs.astype(float)
    half = width // 2
    padded = np.concatenate([np.zeros(half), probs, np.zeros(half)])
    counts = np.concatenate([np.zeros(half), np.ones_like(probs), np.zeros(half)])
    kernel = np.ones(2 * half + 1)
    return np.convolve(padded, kernel, "valid") / np.convolve(counts, kernel, "valid")


def hysteresis(probs: np.ndarray, high: float, low: float) -> np.ndarray:
    """Boolean 'on' per window: switches on at >= high, stays on while >= low."""
    if low > high:
        raise ValueError(f"low threshold {low} is above high threshold {high}")
    on = np.zeros(len(probs), dtype=bool)
    state = False
    for i, p in enumerate(probs):
        state = p >= (low if state else high)
        on[i] = state
    return on


def segments_from_probabilities(
    label: str,
    spans: list[tuple[float, float]],
    probs: np.ndarray,
    fps: float,
    n_frames: int,
    high: float = 0.5,
    low: float | None = None,
    smoothing: int = 1,
    min_duration: float = 0.0,
) -> list[Segment]:
    """Per-window probabilities of one label -> merged segments.

    ``spans`` are the windows' (start, end) seconds in time order; overlapping or touching 'on' windows merge
    into one segment from the first one's start to the last one's end. Each segment's score is the mean
    smoothed probability of its windows. Segments shorter than ``min_duration`` seconds are dropped.
    """
    probs = np.asarray(probs, dtype=float)
    if len(probs) != len(spans):
        raise ValueError(f"{len(probs)} probabilities for {len(spans)} windows")
    p = smooth(probs, smoothing)
    on = hysteresis(p, high, high if low is None else low)
    out: list[Segment] = []
    i = 0
    while i < len(on):
        if not on[i]:
            i += 1
            continue
        j = i
        while j + 1 < len(on) and on[j + 1] and spans[j + 1][0] <= spans[j][1] + 1e-9:
            j += 1
        start, end = spans[i][0], spans[j][1]
        if end - start >= min_duration:
            out.append(Segment.from_seconds(label, start, end, fps, n_frames, float(p[i : j + 1].mean())))
        i = j + 1
    return out


def window_cores(
    spans: list[tuple[float, float]], stride: float, duration: float
) -> list[tuple[float, float]]:
    """The part of time each window stands for: ``stride`` seconds around its centre, so that consecutive
    windows tile the video and a run of 'on' windows maps to a tight segment."""
    if len(spans) == 1:
        return [(0.0, duration)]
    mids = [(s + e) / 2 for s, e in spans]
    bounds = [0.0] + [(a + b) / 2 for a, b in zip(mids, mids[1:], strict=False)] + [duration]
    return list(zip(bounds[:-1], bounds[1:], strict=True))
