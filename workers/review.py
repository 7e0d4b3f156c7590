"""What to review first: how unsure a pre-label is, and which videos a correction teaches the model most.

Every number here comes from the window probabilities pre-labeling already computed (no extra model pass, so
its cost is a few array operations per video), measured against the threshold each label is cut at:

    window     u(p) = 1 - |p - t| / (t if p < t else 1 - t)   1 where P(yes) sits at the label's threshold t,
               0 at P(yes) 0 or 1: how close the window came to the other answer
    segment    the larger of its label part (the mean u over its windows: is the event there at all?) and
               its less certain edge (the mean u of the two windows either side of it: where does it start
               or end?); 0-1
    label      the mean of a label's highest window u's (the top tenth of the video's windows, at least one):
               a missed event (P(yes) just under t, no segment) counts as much as a shaky segment, and a long
               video's number does not grow or shrink with its length
    video      the mean of its labels' numbers: what ranks videos for review

Why the threshold and not 0.5: a round tunes each label's threshold on its validation videos, so "unsure"
means near the point where the answer flips, which for a rare label can sit at P(yes) 0.2.

:func:`next_batch` picks the videos to correct next: most uncertain first, taking labels in turn so a rare
label's uncertain videos are not crowded out by a common one's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

TOP_SHARE = 0.1  # a label's video number is the mean of its top tenth of window uncertainties


def window_uncertainty(probs: Sequence[float] | np.ndarray, threshold: float) -> np.ndarray:
    """Per window: 1 at ``threshold``, falling linearly to 0 at P(yes) 0 and 1."""
    p = np.asarray(probs, dtype=float)
    t = min(max(float(threshold), 1e-6), 1 - 1e-6)
    scale = np.where(p < t, t, 1 - t)
    return np.clip(1 - np.abs(p - t) / scale, 0.0, 1.0)


def segment_uncertainty(u: np.ndarray, first: int, last: int) -> float:
    """A segment made of windows ``first``..``last`` (inclusive), given every window's uncertainty ``u``: the
    larger of the mean inside and its less certain edge (an edge: the mean of the windows on either side)."""
    inside = float(u[first : last + 1].mean())
    start = u[max(first - 1, 0) : first + 1].mean()
    end = u[last : last + 2].mean()
    return round(max(inside, float(start), float(end)), 4)


def label_uncertainty(u: np.ndarray) -> float:
    """One label's number for a video: the mean of its top :data:`TOP_SHARE` window uncertainties."""
    if not len(u):
        return 0.0
    k = max(1, math.ceil(TOP_SHARE * len(u)))
    return round(float(np.sort(u)[-k:].mean()), 4)


def video_uncertainty(
    window_probs: Mapping[str, Sequence[float]], threshold_of: Callable[[str], float]
) -> tuple[float, dict[str, float]]:
    """(the video's number, each label's) from its window probabilities and each label's threshold."""
    per = {
        label: label_uncertainty(window_uncertainty(p, threshold_of(label)))
        for label, p in window_probs.items()
    }
    return (round(float(np.mean(list(per.values()))), 4) if per else 0.0), per


def next_batch(
    candidates: Mapping[str, Mapping[str, float]],
    n: int,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> list[dict]:
    """The ``n`` videos to correct next from ``candidates`` (video -> label -> uncertainty), never one in
    ``exclude`` (already corrected). Labels take turns: each turn takes the not yet
    chosen video that is most uncertain about that label, so every label gets its share of the batch.
    The label the model is least sure of over the whole pool (highest mean uncertainty) goes first, so a
    batch smaller than the label count leaves out the labels it knows best, not the last by name.
    Returns [{"video", "label", "uncertainty", "video_uncertainty"}] in the order they were picked."""
    pool = {v: per for v, per in candidates.items() if v not in exclude and per}
    need = {
        label: float(np.mean([per.get(label, 0.0) for per in pool.values()]))
        for label in {label for per in pool.values() for label in per}
    }
    labels = sorted(need, key=lambda label: (-need[label], label))
    overall = {v: float(np.mean(list(per.values()))) for v, per in pool.items()}
    order = {
        label: sorted(pool, key=lambda v, lab=label: (-pool[v].get(lab, 0.0), -overall[v], v))
        for label in labels
    }
    picked: list[dict] = []
    taken: set[str] = set()
    while len(picked) < n and len(taken) < len(pool):
        for label in labels:
            if len(picked) >= n:
                break
            video = next((v for v in order[label] if v not in taken), None)
            if video is None:
                continue
            taken.add(video)
            picked.append(
                {
                    "video": video,
                    "label": label,
                    "uncertainty": round(pool[video].get(label, 0.0), 4),
                    "video_uncertainty": round(overall[video], 4),
                }
            )
    return picked
