"""Uncertainty of pre-labels and the choice of what to review next (workers.review), and where they land."""

from __future__ import annotations

import numpy as np
import pytest

from workers.events import segments_from_probabilities
from workers.review import label_uncertainty, next_batch, video_uncertainty, window_uncertainty


@pytest.mark.parametrize("threshold", [0.5, 0.2, 0.8])
def test_window_uncertainty_peaks_at_the_labels_threshold(threshold):
    p = np.linspace(0, 1, 101)
    u = window_uncertainty(p, threshold)
    assert p[int(np.argmax(u))] == pytest.approx(threshold)
    assert u.max() == pytest.approx(1.0) and u[0] == pytest.approx(0.0) and u[-1] == pytest.approx(0.0)
    below, above = p < threshold, p > threshold
    assert np.all(np.diff(u[below]) > 0) and np.all(np.diff(u[above]) < 0)  # falls off on both sides


def test_a_segment_whose_probabilities_sit_at_the_threshold_is_the_uncertain_one():
    spans = [(float(i), i + 2.0) for i in range(20)]
    sure = np.array([0.02] * 3 + [0.98] * 5 + [0.02] * 12)
    unsure = np.array([0.02] * 12 + [0.55, 0.6, 0.52, 0.58] + [0.02] * 4)
    segs = segments_from_probabilities("jam", spans, sure + unsure, 10.0, 220, high=0.5)
    assert len(segs) == 2
    first, second = sorted(segs, key=lambda s: s.start_s)
    assert first.uncertainty < 0.2 and second.uncertainty > 0.8
    # an edge placed between a sure 'off' and a half-sure 'on' window is uncertain even if the inside is not
    soft_edge = np.array([0.02] * 5 + [0.5, 0.99, 0.99, 0.99] + [0.02] * 11)
    (seg,) = segments_from_probabilities("jam", spans, soft_edge, 10.0, 220, high=0.5)
    assert seg.uncertainty > 0.4


def test_a_video_ranks_by_its_most_uncertain_windows_not_its_length():
    sure = {"jam": [0.01] * 30, "hand": [0.99] * 10 + [0.01] * 20}
    near = {"jam": [0.01] * 27 + [0.45, 0.5, 0.55], "hand": [0.99] * 10 + [0.01] * 20}
    u_sure, _ = video_uncertainty(sure, lambda label: 0.5)
    u_near, per = video_uncertainty(near, lambda label: 0.5)
    assert u_near > u_sure and per["jam"] > 0.8 and per["hand"] < 0.05
    # the same pattern ten times over (a ten times longer video) gives the same number
    long = {k: v * 10 for k, v in near.items()}
    assert video_uncertainty(long, lambda label: 0.5)[0] == pytest.approx(u_near, abs=1e-3)
    # measured against each label's own threshold: P(yes) 0.2 is unsure where the threshold is 0.2
    assert label_uncertainty(window_uncertainty([0.2] * 5, 0.2)) == pytest.approx(1.0)
    assert label_uncertainty(window_uncertainty([0.2] * 5, 0.5)) < 0.5


def test_next_batch_spreads_over_labels_and_never_repeats_a_corrected_video():
    candidates = {f"v{i}": {"jam": 0.9 - i * 0.01, "hand": 0.1} for i in range(10)}
    candidates["rare"] = {"jam": 0.2, "hand": 0.6}  # the only video unsure about hand
    picked = next_batch(candidates, 4, exclude={"v0", "v1"})
    videos = [p["video"] for p in picked]
    assert len(videos) == 4 == len(set(videos))
    assert "rare" in videos  # not crowded out by the many videos unsure about jam
    assert not {"v0", "v1"} & set(videos)
    assert videos[0] in ("v2", "rare")
    only = next_batch(candidates, 50, exclude=set(candidates) - {"v5"})
    assert [p["video"] for p in only] == ["v5"]  # asking for more than is left gives what is left


def test_next_batch_gives_its_first_turns_to_the_labels_the_model_is_least_sure_of():
    # three labels, a batch of two: the label every video is sure about ("a_known", first by name) gets no turn
    candidates = {
        f"v{i}": {"a_known": 0.05 + i * 0.01, "b_unsure": 0.7 - i * 0.02, "c_unsure": 0.5 + i * 0.03}
        for i in range(6)
    }
    picked = next_batch(candidates, 2)
    assert [p["label"] for p in picked] == ["b_unsure", "c_unsure"]
    assert [p["video"] for p in picked] == ["v0", "v5"]  # each label's most uncertain video


def test_review_tab_sorts_on_the_served_version_or_the_queues_most_common():
    from workers.labelstudio.rest import queue_version

    rows = [{"model_version": v} for v in ("round-1", "round-2", "round-2", None)]
    assert queue_version(rows, "round-1") == "round-1"  # served, and some tasks have its predictions
    assert queue_version(rows, "round-3") == "round-2"  # served has none yet: what most tasks carry
    assert queue_version([{"model_version": None}], "base") is None
