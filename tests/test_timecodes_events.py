"""Seconds <-> frames, windows, hysteresis and segment merging."""

from __future__ import annotations

import numpy as np
import pytest

from workers.events import hysteresis, segments_from_probabilities, smooth, windows
from workers.timecodes import convert_frames, frame_at, frames_to_seconds, seconds_to_frames


@pytest.mark.parametrize("fps", [25.0, 30000 / 1001, 10.0, 59.94])
def test_frames_round_trip_through_seconds(fps):
    n = 5000
    for first, last in [(1, 1), (1, 25), (7, 300), (4999, 5000), (100, 100)]:
        s, e = frames_to_seconds(first, last, fps)
        assert seconds_to_frames(s, e, fps, n) == (first, last)


def test_29_97_fps_boundaries_land_on_the_right_frames():
    fps = 30000 / 1001
    assert frame_at(0.0, fps, 1000) == 1
    assert frame_at(1001 / 30000, fps, 1000) == 2  # exactly the start of frame 2
    assert frame_at(1001 / 30000 - 1e-4, fps, 1000) == 1
    assert seconds_to_frames(1.0, 2.0, fps, 1000) == (30, 60)


def test_frame_ranges_are_clamped_to_the_video_and_never_empty():
    assert seconds_to_frames(-3.0, 999.0, 25.0, 100) == (1, 100)
    assert seconds_to_frames(10.0, 10.0, 25.0, 100) == (100, 100)
    assert seconds_to_frames(1.0, 1.0, 25.0, 100) == (26, 26)
    with pytest.raises(ValueError):
        frames_to_seconds(0, 5, 25.0)
    with pytest.raises(ValueError):
        seconds_to_frames(0, 1, 0.0, 10)


def test_convert_frames_between_frame_rates_goes_through_seconds():
    # frames 26..50 at 25 fps are 1.0-2.0 s, which at 30 fps are frames 31..60
    assert convert_frames(26, 50, 25.0, 30.0, 1000) == (31, 60)


def test_windows_cover_the_video_and_the_last_one_ends_at_its_end():
    w = windows(10.0, 4.0, 2.0)
    assert w[0] == (0.0, 4.0) and w[-1] == (6.0, 10.0)
    w = windows(11.0, 4.0, 2.0)
    assert w[-1] == (7.0, 11.0)
    assert windows(3.0, 4.0, 2.0) == [(0.0, 3.0)]


def test_hysteresis_enters_high_and_leaves_low():
    p = np.array([0.1, 0.55, 0.45, 0.45, 0.3, 0.45, 0.7])
    assert hysteresis(p, high=0.5, low=0.4).tolist() == [False, True, True, True, False, False, True]
    assert hysteresis(p, high=0.5, low=0.5).tolist() == [False, True, False, False, False, False, True]


def test_smoothing_averages_neighbours_and_keeps_edges_unbiased():
    p = np.array([0.0, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(smooth(p, 3), [0.5, 1 / 3, 1 / 3, 0.0])
    np.testing.assert_allclose(smooth(p, 1), p)


def test_segments_merge_runs_and_score_by_mean_probability():
    spans = [(float(i), float(i + 1)) for i in range(8)]
    probs = np.array([0.1, 0.8, 0.6, 0.45, 0.2, 0.9, 0.9, 0.1])
    segs = segments_from_probabilities("jam", spans, probs, fps=10.0, n_frames=80, high=0.5, low=0.4)
    assert [(s.start_s, s.end_s) for s in segs] == [(1.0, 4.0), (5.0, 7.0)]
    assert [(s.first_frame, s.last_frame) for s in segs] == [(11, 40), (51, 70)]
    assert segs[0].score == pytest.approx((0.8 + 0.6 + 0.45) / 3)
    assert all(s.label == "jam" for s in segs)


def test_short_segments_are_dropped_and_a_lone_spike_is_smoothed_away():
    spans = [(float(i), float(i + 1)) for i in range(6)]
    probs = np.array([0.0, 0.0, 0.9, 0.0, 0.0, 0.0])
    assert segments_from_probabilities("x", spans, probs, 10.0, 60, high=0.5, smoothing=3) == []
    segs = segments_from_probabilities("x", spans, probs, 10.0, 60, high=0.5, min_duration=2.0)
    assert segs == []


@pytest.mark.parametrize("start,end", [(7.3, 11.6), (3.85, 6.1), (20.2, 24.9)])
def test_refined_edges_land_between_window_centres_where_the_event_starts_and_ends(start, end):
    """With probabilities that follow the covered share of each window, the refined segment recovers the
    event's edges to well under the 1 s stride; at window bounds it is off by up to half a stride."""
    from workers.events import covered_share, window_cores
    from workers.schemas import Segment

    spans = windows(30.0, 2.0, 1.0)
    event = [Segment.from_seconds("x", start, end, 10.0, 300)]
    probs = np.array([covered_share(event, a, b) for a, b in spans])
    cores = window_cores(spans, 1.0, 30.0)
    centres = [(a + b) / 2 for a, b in spans]
    (plain,) = segments_from_probabilities("x", cores, probs, 10.0, 300, high=0.5, low=0.4)
    (fine,) = segments_from_probabilities("x", cores, probs, 10.0, 300, high=0.5, low=0.4, centres=centres)
    assert abs(fine.start_s - start) < 0.06 and abs(fine.end_s - end) < 0.06
    assert max(abs(plain.start_s - start), abs(plain.end_s - end)) > 0.1
    assert fine.score == plain.score


def test_refinement_keeps_edges_at_the_video_ends_and_checks_its_input():
    spans = windows(6.0, 2.0, 1.0)
    probs = np.array([0.9, 0.9, 0.2, 0.1, 0.1])
    centres = [(a + b) / 2 for a, b in spans]
    (seg,) = segments_from_probabilities("x", spans, probs, 10.0, 60, centres=centres)
    assert seg.start_s == 0.0 and 2.0 < seg.end_s < 3.0
    with pytest.raises(ValueError, match="centres"):
        segments_from_probabilities("x", spans, probs, 10.0, 60, centres=centres[:-1])


def test_covered_shares_of_many_windows_equal_each_windows_covered_share():
    from workers.events import covered_share, covered_shares
    from workers.schemas import Segment

    rng = np.random.default_rng(0)
    for _ in range(20):
        segs = []
        for _ in range(int(rng.integers(0, 6))):  # overlapping, touching, nested and empty segments
            a = float(rng.uniform(0, 28))
            segs.append(Segment.from_seconds("e", a, a + float(rng.uniform(0, 4)), 10.0, 300))
        spans = windows(30.0, float(rng.choice([1.0, 2.5, 4.0])), 0.7)
        expected = [covered_share(segs, a, b) for a, b in spans]
        assert covered_shares(segs, spans) == pytest.approx(expected, abs=1e-9)
