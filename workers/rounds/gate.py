"""The promotion gate: a round's candidate against the served version, on the same validation videos.

A candidate is promoted when both hold:
- its gain in mAP@0.5 is clear: the lower end of a bootstrap interval over the validation videos (the same
  resampled videos for both versions) is above ``margin``;
- it loses no label the served version knew: no label's AP@0.5 falls by more than ``label_drop`` where the
  same resamplings show the fall is real (the upper end of that label's AP-change interval is below 0). On a
  handful of validation videos one video can move a label's AP by 0.2 either way: the demo's round 2 was
  held back for defect 0.76 -> 0.52 on its 7 validation videos while the 12 held-out videos gave it 0.79 ->
  0.79 (bench/README.md).
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
    label_intervals: dict[str, tuple[float, float]] = field(
        default_factory=dict
    )  # label -> AP change interval

    def to_dict(self) -> dict:
        return {
            "promote": self.promote,
            "reason": self.reason,
            "gain": round(self.gain, 4),
            "interval": [round(x, 4) for x in self.interval],
            "lost": {k: [round(a, 4), round(b, 4)] for k, a, b in ((k, *v) for k, v in self.lost.items())},
            "label_intervals": {k: [round(a, 4), round(b, 4)] for k, (a, b) in self.label_intervals.items()},
        }


def _map50(preds: Mapping[str, Sequence[Segment]], gt: Mapping[str, Sequence[Segment]], labels) -> float:
    return evaluate(preds, gt, thresholds=(0.5,), labels=labels).map_at(0.5)


def _per_label50(preds, gt, labels) -> tuple[float, dict[str, float]]:
    report = evaluate(preds, gt, thresholds=(0.5,), labels=labels)
    return report.map_at(0.5), report.per_label(0.5)


def bootstrap_gain(
    candidate: Mapping[str, Sequence[Segment]],
    served: Mapping[str, Sequence[Segment]],
    ground_truth: Mapping[str, Sequence[Segment]],
    labels: Sequence[str],
    resamples: int = 500,
    confidence: float = 0.9,
    seed: int = 0,
    per_label: dict[str, tuple[float, float]] | None = None,
) -> tuple[float, tuple[float, float]]:
    """(gain, (low, high)): the candidate's mAP@0.5 minus the served one's on all validation videos, and
    the central ``confidence`` interval of that difference over ``resamples`` resamplings of the videos
    with replacement (seeded: the same predictions give the same interval). ``per_label``, when given, is
    filled with each label's interval of its AP@0.5 change over the same resamplings."""
    videos = sorted(ground_truth)
    gain = _map50(candidate, ground_truth, labels) - _map50(served, ground_truth, labels)
    if len(videos) < 2:  # one video cannot tell a gain from luck
        if per_label is not None:
            per_label.update({label: (-1.0, 1.0) for label in labels})
        return gain, (-1.0, 1.0)
    rng = np.random.default_rng(seed)
    diffs, label_diffs = [], {label: [] for label in labels}
    for _ in range(resamples):
        pick = [videos[i] for i in rng.integers(0, len(videos), len(videos))]
        keys = [f"{k}:{v}" for k, v in enumerate(pick)]  # a video drawn twice counts twice
        gt = {k: ground_truth[v] for k, v in zip(keys, pick, strict=True)}
        cand = {k: candidate.get(v, []) for k, v in zip(keys, pick, strict=True)}
        serv = {k: served.get(v, []) for k, v in zip(keys, pick, strict=True)}
        (m_cand, l_cand), (m_serv, l_serv) = _per_label50(cand, gt, labels), _per_label50(serv, gt, labels)
        diffs.append(m_cand - m_serv)
        for label in labels:
            label_diffs[label].append(l_cand.get(label, 0.0) - l_serv.get(label, 0.0))
    tail = (1 - confidence) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    if per_label is not None:
        for label, d in label_diffs.items():
            lo, hi = np.quantile(d, [tail, 1 - tail])
            per_label[label] = (float(lo), float(hi))
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
    label_intervals: Mapping[str, tuple[float, float]] | None = None,
) -> GateDecision:
    """The gate's decision from both versions' per-label AP@0.5 and the bootstrap interval of the gain.
    ``label_intervals`` (label -> interval of its AP change, from :func:`bootstrap_gain`): a label counts as
    lost only where its interval lies below 0 too; without them, the point drop alone decides."""
    intervals = label_intervals or {}
    lost = {
        label: (ap, candidate_ap.get(label, 0.0))
        for label, ap in served_ap.items()
        if ap - candidate_ap.get(label, 0.0) > label_drop and intervals.get(label, (-1.0, -1.0))[1] < 0
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
    return GateDecision(promote, why, gain, interval, lost, dict(intervals))
