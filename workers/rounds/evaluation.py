"""Temporal detection evaluation, ActivityNet style: per-label AP over tIoU thresholds and their mean.

Per label and threshold: predictions of all videos ranked by score; within its video each prediction
takes the unmatched ground-truth segment of its label with the highest tIoU >= threshold (a true
positive) or is a false positive; AP is the area under the (monotone) precision-recall curve without
point interpolation. mAP is the mean over labels that have ground truth (and over thresholds).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from workers.schemas import Segment

DEFAULT_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)


def _span(seg: Segment, on: str) -> tuple[float, float]:
    # "seconds": [start_s, end_s); "frames": the support's end points, as FiftyOne measures tIoU.
    return (seg.start_s, seg.end_s) if on == "seconds" else (float(seg.first_frame), float(seg.last_frame))


def tiou(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Temporal IoU of two (start, end) spans; two equal points count as 1."""
    la, lb = a[1] - a[0], b[1] - b[0]
    if la == 0 and lb == 0:
        return 1.0 if a == b else 0.0
    inter = min(a[1], b[1]) - max(a[0], b[0])
    if inter <= 0:
        return 0.0
    return inter / (la + lb - inter)


def average_precision(
    predictions: Mapping[str, Sequence[Segment]],
    ground_truth: Mapping[str, Sequence[Segment]],
    label: str,
    threshold: float,
    span: str = "seconds",
) -> float | None:
    """AP of one label at one tIoU threshold over all videos; None where the label has no ground truth."""
    n_gt = sum(1 for segs in ground_truth.values() for s in segs if s.label == label)
    if n_gt == 0:
        return None
    hits: list[tuple[float, int]] = []  # (score, 1 for TP / 0 for FP)
    for video, preds in predictions.items():
        gts = [_span(g, span) for g in ground_truth.get(video, ()) if g.label == label]
        taken = [False] * len(gts)
        for p in sorted((p for p in preds if p.label == label), key=lambda p: -p.score):
            ps = _span(p, span)
            best, best_iou = None, min(threshold, 1 - 1e-10)
            for j, g in enumerate(gts):
                iou = tiou(ps, g)
                if not taken[j] and iou >= best_iou:
                    best, best_iou = j, iou
            if best is not None:
                taken[best] = True
            hits.append((p.score, int(best is not None)))
    if not hits:
        return 0.0
    # rank by score; among equal scores true positives first (a stable sort of TPs before FPs)
    hits.sort(key=lambda h: (-h[0], -h[1]))
    tp = np.cumsum([h[1] for h in hits], dtype=float)
    precision = tp / np.arange(1, len(hits) + 1)
    recall = tp / n_gt
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # monotone envelope
    mprec = np.concatenate([[0], precision, [0]])
    mrec = np.concatenate([[0], recall, [1]])
    idx = np.where(mrec[1:] != mrec[:-1])[0] + 1
    return float(np.sum((mrec[idx] - mrec[idx - 1]) * mprec[idx]))


@dataclass
class EvaluationReport:
    """AP per label and threshold, and the summaries the rounds and the demo report."""

    thresholds: tuple[float, ...]
    ap: dict[str, dict[float, float]] = field(default_factory=dict)  # label -> threshold -> AP

    def map_at(self, threshold: float) -> float:
        vals = [a[threshold] for a in self.ap.values() if threshold in a]
        return float(np.mean(vals)) if vals else 0.0

    @property
    def mean_ap(self) -> float:
        """Mean over labels and thresholds."""
        vals = [v for a in self.ap.values() for v in a.values()]
        return float(np.mean(vals)) if vals else 0.0

    def per_label(self, threshold: float = 0.5) -> dict[str, float]:
        return {label: a[threshold] for label, a in sorted(self.ap.items()) if threshold in a}

    def to_dict(self) -> dict:
        return {
            "mAP@0.5": round(self.map_at(0.5), 4) if 0.5 in self.thresholds else None,
            "mAP": round(self.mean_ap, 4),
            "thresholds": list(self.thresholds),
            "per_label_AP@0.5": {k: round(v, 4) for k, v in self.per_label(0.5).items()},
            "per_label_AP": {
                k: round(float(np.mean(list(a.values()))), 4) for k, a in sorted(self.ap.items())
            },
        }


def evaluate(
    predictions: Mapping[str, Sequence[Segment]],
    ground_truth: Mapping[str, Sequence[Segment]],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    labels: Sequence[str] | None = None,
    span: str = "seconds",
) -> EvaluationReport:
    """Evaluate predicted segments against ground truth, both keyed by video.

    ``labels`` defaults to every label with ground truth. ``span="frames"`` measures tIoU between the
    1-based frame end points (FiftyOne's ``evaluate_detections`` convention); ``"seconds"`` uses the
    segments' times.
    """
    if span not in ("seconds", "frames"):
        raise ValueError(f"span must be 'seconds' or 'frames', got {span!r}")
    if labels is None:
        labels = sorted({s.label for segs in ground_truth.values() for s in segs})
    report = EvaluationReport(tuple(thresholds))
    per: dict[str, dict[float, float]] = defaultdict(dict)
    for label in labels:
        for t in thresholds:
            ap = average_precision(predictions, ground_truth, label, t, span)
            if ap is not None:
                per[label][t] = ap
    report.ap = dict(per)
    return report


def roc_auc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """Area under the ROC curve (ties count half); None without both classes."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def window_auc(
    windows_of: Mapping[str, Sequence[tuple[float, float]]],
    probs_of: Mapping[str, Mapping[str, Sequence[float]]],
    ground_truth: Mapping[str, Sequence[Segment]],
    labels: Sequence[str],
    yes_overlap: float = 0.5,
) -> dict[str, float | None]:
    """Per label, the ROC-AUC of window P(yes) against the windows' targets as rounds train them (events
    cover at least ``yes_overlap`` of the window: yes; none of it: no; in between: left out). Inputs are
    keyed by video: its windows, its per-label window probabilities, its ground truth."""
    from workers.events import covered_share

    out: dict[str, float | None] = {}
    for label in labels:
        scores, targets = [], []
        for video, spans in windows_of.items():
            gt = [g for g in ground_truth.get(video, ()) if g.label == label]
            for (a, b), p in zip(spans, probs_of[video][label], strict=True):
                share = covered_share(gt, a, b)
                if share >= yes_overlap or share == 0:
                    scores.append(p)
                    targets.append(share >= yes_overlap)
        out[label] = roc_auc(scores, targets)
    return out
