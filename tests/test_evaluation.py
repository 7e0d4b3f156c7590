"""Temporal mAP: hand-computed cases and agreement with FiftyOne's evaluate_detections."""

from __future__ import annotations

import numpy as np
import pytest

from workers.rounds.evaluation import evaluate, tiou
from workers.schemas import Segment


def seg(label, first, last, score=1.0, fps=10.0):
    return Segment(
        label=label,
        start_s=(first - 1) / fps,
        end_s=last / fps,
        first_frame=first,
        last_frame=last,
        score=score,
    )


def test_tiou():
    assert tiou((0, 10), (5, 15)) == pytest.approx(5 / 15)
    assert tiou((0, 1), (2, 3)) == 0.0
    assert tiou((3, 3), (3, 3)) == 1.0


def test_perfect_predictions_score_one_and_misses_lower_it():
    gt = {"a": [seg("jam", 1, 50), seg("hand", 60, 80)], "b": [seg("jam", 10, 40)]}
    assert evaluate(gt, gt).map_at(0.5) == 1.0
    preds = {"a": [seg("jam", 1, 50, 0.9), seg("jam", 200, 220, 0.95)], "b": [seg("jam", 10, 40, 0.3)]}
    report = evaluate(preds, gt)
    # jam ranking: FP(0.95), TP(0.9), TP(0.3) -> precision 0, 1/2, 2/3 -> AP = 0.5*(2/3) + 0.5*(2/3)
    assert report.ap["jam"][0.5] == pytest.approx(2 / 3)
    assert report.ap["hand"][0.5] == 0.0
    assert report.map_at(0.5) == pytest.approx(1 / 3)


def _random_case(rng, n_videos=6, labels=("jam", "defect", "hand")):
    gt, preds = {}, {}
    for v in range(n_videos):
        name = f"v{v}"
        gt[name], preds[name] = [], []
        for label in labels:
            for _ in range(rng.integers(0, 3)):
                a = int(rng.integers(1, 250))
                gt[name].append(seg(label, a, a + int(rng.integers(5, 60))))
            for _ in range(rng.integers(0, 4)):
                a = int(rng.integers(1, 250))
                preds[name].append(
                    seg(label, a, a + int(rng.integers(5, 60)), round(float(rng.uniform()), 3))
                )
        # a few near-copies of ground truth so that there are true positives at every threshold
        for g in gt[name][:2]:
            preds[name].append(
                seg(g.label, g.first_frame + 2, g.last_frame - 1, round(float(rng.uniform()), 3))
            )
    return gt, preds


def test_map_agrees_with_fiftyone_evaluate_detections(fiftyone, tmp_path):
    fo = fiftyone
    thresholds = [0.3, 0.5, 0.7]
    for seed in range(3):
        gt, preds = _random_case(np.random.default_rng(seed))
        ds = fo.Dataset()
        samples = []
        for name in gt:
            s = fo.Sample(filepath=str(tmp_path / f"{name}.mp4"))
            s["gt"] = fo.TemporalDetections(
                detections=[
                    fo.TemporalDetection(label=g.label, support=[g.first_frame, g.last_frame])
                    for g in gt[name]
                ]
            )
            s["pred"] = fo.TemporalDetections(
                detections=[
                    fo.TemporalDetection(
                        label=p.label, support=[p.first_frame, p.last_frame], confidence=p.score
                    )
                    for p in preds[name]
                ]
            )
            samples.append(s)
        ds.add_samples(samples)
        fo_results = ds.evaluate_detections(
            "pred", gt_field="gt", eval_key="ev", compute_mAP=True, iou_threshs=thresholds
        )
        ours = evaluate(preds, gt, thresholds=thresholds, span="frames")
        assert ours.mean_ap == pytest.approx(fo_results.mAP(), abs=1e-9), seed
        ds.delete()


def test_roc_auc_counts_ties_half_and_needs_both_classes():
    from workers.rounds.evaluation import roc_auc

    assert roc_auc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0
    assert roc_auc([0.5, 0.5], [False, True]) == 0.5
    assert roc_auc([0.3, 0.4, 0.35], [True, False, True]) == pytest.approx(0.0)
    assert roc_auc([0.1, 0.2], [True, True]) is None
