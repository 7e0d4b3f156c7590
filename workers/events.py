"""Events over time: windows over a video, and per-window probabilities -> merged segments.

windows(duration) -> [(start, end), ...]
probabilities per window -> smooth (moving average) -> hysteresis (enter >= high, stay >= low)
-> runs of windows -> one segment per run, scored by the mean probability over the run
-> (optional) each edge moved to where the probability, interpolated between window centres, crosses the
   threshold: finer than the stride
"""

from __future__ import annotations

import numpy as np

from workers.review import segment_uncertainty, window_uncertainty
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


def _crossing(t0: float, p0: float, t1: float, p1: float, threshold: float) -> float:
    """Where the line through (t0, p0), (t1, p1) crosses ``threshold``, clipped to [t0, t1]."""
    if p1 == p0:
        return (t0 + t1) / 2
    return float(np.clip(t0 + (threshold - p0) / (p1 - p0) * (t1 - t0), t0, t1))


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
    centres: list[float] | None = None,
) -> list[Segment]:
    """Per-window probabilities of one label -> merged segments.

    ``spans`` are the windows' (start, end) seconds in time order; overlapping or touching 'on' windows merge
    into one segment from the first one's start to the last one's end. Each segment's score is the mean
    smoothed probability of its windows, its ``uncertainty`` how unsure its label and edges are
    (:func:`workers.review.segment_uncertainty`, against ``high``). Segments shorter than ``min_duration`` seconds are dropped.

    With ``centres`` (each window's centre in seconds), an edge between an 'off' and an 'on' window is placed
    where the probability, linearly interpolated between the two centres, crosses ``high`` (``low`` only
    keeps a run going). A window is trained as showing an event when the event covers half of it, and the
    covered share is linear in the window's position, so the crossing recovers an edge to a fraction of the
    stride without scoring more windows.
    """
    probs = np.asarray(probs, dtype=float)
    if len(probs) != len(spans):
        raise ValueError(f"{len(probs)} probabilities for {len(spans)} windows")
    if centres is not None and len(centres) != len(spans):
        raise ValueError(f"{len(centres)} centres for {len(spans)} windows")
    low = high if low is None else low
    p = smooth(probs, smoothing)
    on = hysteresis(p, high, low)
    u = window_uncertainty(p, high)
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
        if centres is not None and i > 0 and not on[i - 1]:
            start = _crossing(centres[i - 1], p[i - 1], centres[i], p[i], high)
        last = max(k for k in range(i, j + 1) if p[k] >= high)  # after it the run only holds on ``low``
        if centres is not None and last + 1 < len(on) and (last < j or not on[j + 1]):
            end = _crossing(centres[last], p[last], centres[last + 1], p[last + 1], high)
        if end - start >= min_duration and end > start:
            score = float(p[i : j + 1].mean())
            out.append(
                Segment.from_seconds(label, start, end, fps, n_frames, score, segment_uncertainty(u, i, j))
            )
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


def covered_share(segments: list[Segment], start: float, end: float) -> float:
    """Share of [start, end) covered by the union of ``segments`` (what a window is trained to answer)."""
    spans = sorted(
        (max(s.start_s, start), min(s.end_s, end)) for s in segments if s.end_s > start and s.start_s < end
    )
    total, cur_s, cur_e = 0.0, None, None
    for a, b in spans:
        if cur_e is None or a > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = a, b
        else:
            cur_e = max(cur_e, b)
    if cur_e is not None:
        total += cur_e - cur_s
    return total / (end - start)


def covered_shares(segments: list[Segment], spans: list[tuple[float, float]]) -> np.ndarray:
    """:func:`covered_share` of every window in ``spans`` at once: the union of ``segments`` as a cumulative
    covered-time curve, read at each window's ends (O(segments log segments + windows), for many windows)."""
    merged: list[list[float]] = []
    for a, b in sorted((s.start_s, s.end_s) for s in segments if s.end_s > s.start_s):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    starts = np.array([a for a, _ in spans], dtype=float)
    ends = np.array([b for _, b in spans], dtype=float)
    if not merged:
        return np.zeros(len(spans))
    knots = np.array(merged).ravel()  # a0 b0 a1 b1 ...: the curve rises on [a, b] and is flat between
    lengths = np.diff(np.array(merged), axis=1).ravel()
    level = np.concatenate([[0.0], np.cumsum(lengths)])
    values = np.empty(len(knots))
    values[0::2], values[1::2] = level[:-1], level[1:]
    covered = np.interp(ends, knots, values) - np.interp(starts, knots, values)
    return covered / np.maximum(ends - starts, 1e-12)
