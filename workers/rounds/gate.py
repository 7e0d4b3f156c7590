"""The promotion gate: a round's candidate against the served version, on the same validation videos.

A candidate is promoted when both hold:
- its gain in mAP@0.5 is clear: the lower end of a bootstrap interval over the validation videos (the same
  resampled videos for both versions) is above ``margin``;
- it loses no label the served version knew: no label's AP@0.5 falls by more than ``label_drop``.
A forced round is promoted whatever the gate says; the reason still says what the gate found.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from workers.rounds.evaluation import evaluate
from workers.schemas import Segment


@dataclass
class GateDecision:
    promote: bool
    reason: str
    gain: float  # candidate minus served mAP@0.5 on the validation videos
    interval: tuple[float, float]  # bootstrap interval of the gain
    lost: dict[str, tuple[float, float]] = field(default_factory=dict)  # label -> (served AP, candidate AP)

    def to_dict(self) -> dict:
        return {
            "promote": self.promote,
            "reason": self.reason,
            "gain": round(self.gain, 4),
            "interval": [round(x, 4) for x in self.interval],
            "lost": {k: [round(a, 4), round(b, 4)] for k, a, b in ((k, *v) for k, v in self.lost.items())},
        }


def _map50(preds: Mapping[str, Sequence[Segment]], gt: Mapping[str, Sequence[Segment]], labels) -> float:
    return evaluate(preds, gt, thresholds=(0.5,), labels=labels).map_at(0.5)


def bootstrap_gain(
    candidate: Mapping[str, Sequence[Segment]],
    served: Mapping[str, Sequence[Segment]],
    ground_truth: Mapping[str, Sequence[Segment]],
    labels: Sequence[str],
    resamples: int = 500,
    confidence: float = 0.9,
    seed: int = 0,
) -> tuple[float, tuple[float, float]]:
    """(gain, (low, high)): the candidate's mAP@0.5 minus the served one's on all validation videos, and
    the central ``confidence`` interval of that difference over ``resamples`` resamplings of the videos
    with replacement (seeded: the same predictions give the same interval)."""
    videos = sorted(ground_truth)
    gain = _map50(candidate, ground_truth, labels) - _map50(served, ground_truth, labels)
    if len(videos) < 2:  # one video cannot tell a gain from luck
        return gain, (-1.0, 1.0)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(resamples):
        pick = [videos[i] for i in rng.integers(0, len(videos), len(videos))]
        keys = [f"{k}:{v}" for k, v in enumerate(pick)]  # a video drawn twice counts twice
        gt = {k: ground_truth[v] for k, v in zip(keys, pick, strict=True)}
        cand = {k: candidate.get(v, []) for k, v in zip(keys, pick, strict=True)}
        serv = {k: served.get(v, []) for k, v in zip(keys, pick, strict=True)}
        diffs.append(_map50(cand, gt, labels) - _map50(serv, gt, labels))
    tail = (1 - confidence) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    return gain, (float(low), float(high))


def decide(
    candidate_name: str,
    served_name: str,
    candidate_ap: Mapping[str, float],
    served_ap: Mapping[str, float],
    gain: float,
    interval: tuple[float, float],
    margin: float = 0.0,
    label_drop: float = 0.15,
    force: bool = False,
) -> GateDecision:
    """The gate's decision from both versions' per-label AP@0.5 and the bootstrap interval of the gain."""
    lost = {
        label: (ap, candidate_ap.get(label, 0.0))
        for label, ap in served_ap.items()
        if ap - candidate_ap.get(label, 0.0) > label_drop
    }
    clear = interval[0] > margin
    promote = (clear and not lost) or force
    why = f"{candidate_name} vs {served_name}: mAP@0.5 gain {gain:+.3f}, interval [{interval[0]:+.3f}, {interval[1]:+.3f}]"
    if lost:
        why += "; loses " + ", ".join(
            f"{k} (AP@0.5 {a:.2f} -> {b:.2f})" for k, (a, b) in sorted(lost.items())
        )
    elif not clear:
        why += f"; the gain is not clearly above {margin:+.3f}"
    if force and not (clear and not lost):
        why += " (forced)"
    return GateDecision(promote, why, gain, interval, lost)
