"""The promotion gate, the window choice and snapshot accumulation: pure functions, no model."""

from __future__ import annotations

import pytest

from workers.rounds.corrections import accumulate, choose_windows
from workers.rounds.evaluation import evaluate
from workers.rounds.gate import (
    bootstrap_auc_gain,
    bootstrap_gain,
    bootstrap_overlap_gain,
    bootstrap_window_gain,
    decide,
    timeline_iou,
    timeline_overlap_terms,
    window_error,
    window_error_terms,
    window_ranking_parts,
)
from workers.schemas import (
    CorrectedVideo,
    PrelabelResult,
    PrelabelSettings,
    Segment,
    Snapshot,
    VideoMeta,
    parse_labels,
)


def seg(label: str, a: float, b: float, score: float = 1.0) -> Segment:
    return Segment.from_seconds(label, a, b, 10.0, 300, score)


def videos(n: int) -> dict[str, list[Segment]]:
    return {f"v{i}": [seg("jam", 2.0 + i % 5, 6.0 + i % 5), seg("hand", 12.0, 14.0)] for i in range(n)}


def test_a_version_against_itself_gains_nothing_and_is_not_promoted():
    gt = videos(8)
    gain, (low, high) = bootstrap_gain(gt, gt, gt, ["jam", "hand"], resamples=100)
    assert gain == 0.0 and low == high == 0.0
    d = decide("round-2", "round-1", {"jam": 1.0}, {"jam": 1.0}, gain, (low, high))
    assert not d.promote and "not clearly above" in d.reason


def test_a_clearly_better_candidate_is_promoted_and_a_lucky_one_on_two_videos_is_not():
    gt = videos(10)
    served = {v: [seg("jam", 20.0, 24.0)] for v in gt}  # never right
    gain, interval = bootstrap_gain(gt, served, gt, ["jam", "hand"], resamples=200)
    assert gain == pytest.approx(1.0) and interval[0] > 0.5
    assert decide("round-1", "base", {"jam": 1.0, "hand": 1.0}, {}, gain, interval).promote
    # right on one of two videos, as the served version is on the other: no clear gain
    two = dict(list(gt.items())[:2])
    cand = {"v0": two["v0"], "v1": []}
    serv = {"v0": [], "v1": two["v1"]}
    gain, interval = bootstrap_gain(cand, serv, two, ["jam", "hand"], resamples=200)
    assert interval[0] < 0 < interval[1]
    assert not decide("round-1", "base", {}, {}, gain, interval).promote


def test_a_candidate_that_loses_a_known_label_is_held_back_and_the_reason_names_it():
    d = decide("round-2", "round-1", {"jam": 0.9, "hand": 0.1}, {"jam": 0.3, "hand": 0.8}, 0.2, (0.05, 0.4))
    assert not d.promote and "hand (AP@0.5 0.80 -> 0.10)" in d.reason and set(d.lost) == {"hand"}
    forced = decide("round-2", "round-1", {"hand": 0.1}, {"hand": 0.8}, 0.0, (-0.1, 0.1), force=True)
    assert forced.promote and "(forced)" in forced.reason


def test_a_label_drop_counts_only_where_the_resampled_videos_agree():
    """hand is lost on one validation video of four and kept on the others: its AP falls, but resampling the
    videos shows the fall may be luck, so the gate does not hold the candidate back for it; where every video
    loses it, it does."""

    def seg(label, a, b):
        return Segment.from_seconds(label, a, b, 10.0, 300)

    gt = {f"v{i}": [seg("hand", 2.0, 5.0), seg("jam", 10.0, 14.0)] for i in range(4)}
    served = {k: list(v) for k, v in gt.items()}
    one_bad = {k: (list(v) if k != "v0" else [seg("jam", 10.0, 14.0)]) for k, v in gt.items()}
    all_bad = {k: [seg("jam", 10.0, 14.0)] for k in gt}
    for cand, lost in ((one_bad, False), (all_bad, True)):
        intervals: dict = {}
        gain, interval = bootstrap_gain(cand, served, gt, ["hand", "jam"], 300, 0.9, 0, intervals)
        cand_ap = evaluate(cand, gt, thresholds=(0.5,), labels=["hand", "jam"]).per_label(0.5)
        served_ap = evaluate(served, gt, thresholds=(0.5,), labels=["hand", "jam"]).per_label(0.5)
        assert served_ap["hand"] - cand_ap["hand"] > 0.15  # the point estimate drops either way
        d = decide("round-2", "round-1", cand_ap, served_ap, gain, (0.01, 0.2), label_intervals=intervals)
        assert ("hand" in d.lost) == lost and d.promote == (not lost)
        assert d.to_dict()["label_intervals"]["hand"][0] <= 0


def scored(probs: dict[str, list[float]]) -> PrelabelResult:
    """A 30 s video's result with one window per 2 s (no overlap) and the given P(yes) per label."""
    n = len(next(iter(probs.values())))
    return PrelabelResult(
        video="v.mp4",
        model_version="x",
        meta=VideoMeta(fps=10.0, n_frames=300, duration=30.0),
        windows=[(2.0 * k, 2.0 * k + 2.0) for k in range(n)],
        window_probs=probs,
    )


def test_window_error_counts_windows_as_rounds_train_them():
    """jam covers windows 1-2 fully (yes), window 3 by a quarter (left out), the rest not at all (no)."""
    truth = [seg("jam", 2.0, 6.5)]
    perfect = scored({"jam": [0.0, 1.0, 1.0, 0.9, 0.0, 0.0], "hand": [0.5] * 6})
    terms = window_error_terms(perfect, truth, ["jam", "hand"])
    assert terms[0].tolist() == [0.0, 2.0, 0.0, 3.0]  # the partly covered window counts for neither side
    assert terms[1].tolist() == [0.0, 0.0, 6 * 0.25, 6.0]  # hand: all six windows are a no, each off by 0.5
    assert window_error({"v": terms}) == pytest.approx((0.0 + 0.25) / 2)  # the mean over the two labels
    unchecked = window_error_terms(perfect, truth, ["jam", "hand"], checked=["jam"])
    assert unchecked[1].tolist() == [0.0] * 4  # nobody checked it for hands: its windows say nothing


def test_the_window_gate_promotes_sharper_probabilities_and_holds_back_no_change():
    truth = {f"v{i}": [seg("jam", 2.0, 6.0), seg("hand", 10.0, 12.0)] for i in range(6)}
    sharp = {"jam": [0.1, 0.9, 0.9, 0.1, 0.1, 0.1, 0.1], "hand": [0.1, 0.1, 0.1, 0.1, 0.1, 0.9, 0.1]}
    vague = {k: [0.5 + (p - 0.5) * 0.2 for p in v] for k, v in sharp.items()}
    cand = {v: window_error_terms(scored(sharp), g, ["jam", "hand"]) for v, g in truth.items()}
    served = {v: window_error_terms(scored(vague), g, ["jam", "hand"]) for v, g in truth.items()}
    gain, interval, per_label = bootstrap_window_gain(cand, served, resamples=200, labels=["jam", "hand"])
    assert gain == pytest.approx(window_error(served) - window_error(cand)) and interval[0] > 0
    d = decide("round-2", "round-1", {}, {}, -0.1, (-0.3, 0.1), window_gain=gain, window_interval=interval)
    assert d.promote and d.on == "windows" and "window error falls by" in d.reason  # mAP@0.5 alone: held back
    assert all(lo > 0 for lo, _ in per_label.values())  # both labels' windows are sharper
    same, same_interval, _ = bootstrap_window_gain(cand, cand, resamples=50)
    assert same == 0.0 and same_interval == (0.0, 0.0)
    held = decide(
        "round-2", "round-1", {}, {}, 0.2, (0.1, 0.3), window_gain=same, window_interval=same_interval
    )
    assert not held.promote and "window gain is not clearly above" in held.reason

    def hand_falls(label_intervals=None):  # hand's AP 0.9 -> 0.1 on the validation videos, windows better
        return decide(
            "round-2",
            "round-1",
            {"hand": 0.1},
            {"hand": 0.9},
            0.0,
            (0.0, 0.0),
            label_intervals=label_intervals,
            window_gain=gain,
            window_interval=interval,
        )

    # a label clearly lost still holds back a candidate whose windows are better
    lost = hand_falls()
    assert not lost.promote and "hand" in lost.reason
    # gating on windows: a label whose AP fell on a few events but whose windows are no worse is not lost
    kept = hand_falls(per_label)
    assert kept.promote and not kept.lost
    worse = {
        v: window_error_terms(scored(sharp | {"hand": vague["hand"]}), g, ["jam", "hand"])
        for v, g in truth.items()
    }
    _, _, hand_worse = bootstrap_window_gain(worse, cand, resamples=200, labels=["jam", "hand"])
    assert hand_worse["hand"][1] < 0  # hand's windows clearly worse than the served version's
    assert not hand_falls(hand_worse).promote


def test_a_wide_window_interval_with_map_clearly_up_and_windows_better_is_a_clear_gain():
    # the second event set's round 1 on 3 validation videos: window error falls by +0.035 [-0.001, +0.097],
    # mAP@0.5 +0.393 [+0.333, +0.415]
    agree = decide(
        "round-1", "base", {}, {}, 0.393, (0.333, 0.415), window_gain=0.035, window_interval=(-0.001, 0.097)
    )
    assert agree.promote and "mAP@0.5 is clearly up and the windows improve" in agree.reason
    worse = decide(
        "round-1", "base", {}, {}, 0.393, (0.333, 0.415), window_gain=-0.01, window_interval=(-0.05, 0.02)
    )
    assert not worse.promote and "not clearly above" in worse.reason  # the windows say otherwise: held
    unclear = decide(
        "round-1", "base", {}, {}, 0.1, (-0.05, 0.3), window_gain=0.035, window_interval=(-0.001, 0.097)
    )
    assert not unclear.promote  # neither interval clear


def corrected(vid: str, segments: list[Segment]) -> CorrectedVideo:
    return CorrectedVideo(
        video_id=vid, video=f"/v/{vid}.mp4", fps=10.0, n_frames=300, duration=30.0, segments=segments
    )


def test_the_ranking_gate_sees_better_order_and_ignores_a_calibration_shift():
    """Six videos of 15 windows, jam in windows 3-6 and 10-11. A candidate that orders jam's windows better
    promotes on its window ROC-AUC; one that only cubes the served P(yes) (the same order, a calibration shift
    the tuned thresholds absorb) has no AUC gain, though its window error changes."""
    from sklearn.metrics import roc_auc_score

    truth = [seg("jam", 6.0, 14.0), seg("jam", 20.0, 24.0)]
    yes = {3, 4, 5, 6, 10, 11}
    videos = {}
    for v in range(6):  # served: one yes window per video (another in each) below most no windows
        miss = sorted(yes)[v]
        vague = [0.55 if k in yes and k != miss else 0.45 + 0.01 * (k % 3) for k in range(15)]
        sharp = [0.9 if k in yes else 0.1 for k in range(15)]
        videos[f"v{v}"] = (vague, sharp)

    def parts(pick):
        return {v: window_ranking_parts(scored({"jam": pick(p)}), truth, ["jam"]) for v, p in videos.items()}

    served, better = parts(lambda p: p[0]), parts(lambda p: p[1])
    cubed = parts(lambda p: [x**3 for x in p[0]])
    gain, interval, per_label = bootstrap_auc_gain(better, served, resamples=200, labels=["jam"])
    pooled = [x for v in served.values() for x in (*v[0][0], *v[0][1])]
    target = [y for v in served.values() for y in [1] * len(v[0][0]) + [0] * len(v[0][1])]
    assert gain == pytest.approx(1.0 - roc_auc_score(target, pooled))  # the pooled AUC, as sklearn has it
    assert interval[0] > 0 and per_label["jam"][0] > 0
    d = decide(
        "round-2",
        "round-1",
        {},
        {},
        0.0,
        (-1.0, 1.0),
        window_gain=gain,
        window_interval=interval,
        statistic="ranking",
    )
    assert d.promote and d.on == "ranking" and "window ROC-AUC rises by" in d.reason
    same, same_interval, _ = bootstrap_auc_gain(cubed, served, resamples=200, labels=["jam"])
    assert same == pytest.approx(0.0) and same_interval == pytest.approx((0.0, 0.0))
    assert not decide("c", "s", {}, {}, 0.0, (-1, 1), window_gain=same, window_interval=same_interval).promote
    terms = {
        k: {v: window_error_terms(scored({"jam": pick(p)}), truth, ["jam"]) for v, p in videos.items()}
        for k, pick in (("served", lambda p: p[0]), ("cubed", lambda p: [x**3 for x in p[0]]))
    }
    assert abs(window_error(terms["served"]) - window_error(terms["cubed"])) > 0.05  # the Brier score moves
    one = {"v0": better["v0"]}
    assert bootstrap_auc_gain(one, {"v0": served["v0"]}, labels=["jam"])[1] == (-1.0, 1.0)  # one video


def test_timeline_overlap_scores_the_served_segments_seconds():
    truth = [seg("jam", 2, 6), seg("jam", 10, 12), seg("hand", 0, 1)]
    pred = [seg("jam", 3, 7), seg("jam", 4, 5), seg("hand", 20, 21)]  # overlapping predictions count once
    terms = timeline_overlap_terms(pred, truth, ["jam", "hand", "defect"])
    assert terms.ravel().tolist() == pytest.approx([3.0, 7.0, 0.0, 2.0, 0.0, 0.0])
    assert timeline_iou({"a": terms}) == pytest.approx((3 / 7 + 0) / 2)  # defect: covered by none, left out
    assert timeline_overlap_terms(pred, truth, ["jam"], checked=["hand"]).tolist() == [[0.0, 0.0]]
    videos = {f"v{k}": truth for k in range(6)}
    good = {v: timeline_overlap_terms(t, t, ["jam", "hand"]) for v, t in videos.items()}
    poor = {v: timeline_overlap_terms(pred, t, ["jam", "hand"]) for v, t in videos.items()}
    gain, (lo, hi), per_label = bootstrap_overlap_gain(good, poor, 200, 0.9, 0, ["jam", "hand"])
    assert gain == pytest.approx(1 - (3 / 7 + 0) / 2) and lo > 0
    assert per_label["hand"] == pytest.approx((1.0, 1.0))
    same = bootstrap_overlap_gain(poor, poor, 200, 0.9, 0, ["jam", "hand"])
    assert same[0] == 0 and same[1] == (0.0, 0.0)
    assert bootstrap_overlap_gain({"v0": good["v0"]}, {"v0": poor["v0"]}, 50)[1] == (-1.0, 1.0)


def test_windows_are_the_longest_whose_ceiling_stays_near_the_best():
    from workers.rounds.corrections import CEILING_SHARE, WINDOW_CHOICES, window_ceiling

    labels = parse_labels(["jam", "hand"])
    short = [seg("jam", 0, 6), seg("jam", 10, 18), seg("hand", 20, 21.3), seg("hand", 25, 26.1)]
    snap = Snapshot(labels=labels, videos=[corrected("a", short), corrected("b", short[:2])])
    chosen = choose_windows(snap)
    assert chosen["stride_s"] == chosen["window_s"] / 2
    ceilings = {w: window_ceiling(snap, w) for w in WINDOW_CHOICES}
    best = max(ceilings.values())
    assert ceilings[chosen["window_s"]] >= CEILING_SHARE * best
    assert all(c < CEILING_SHARE * best for w, c in ceilings.items() if w > chosen["window_s"])
    assert chosen["window_s"] <= 2.0  # 1.1-1.3 s hands: a 4 s window would merge them into the background
    assert ceilings[1.0] == pytest.approx(1.0) and ceilings[16.0] < 0.5
    long = Snapshot(labels=labels, videos=[corrected("a", [seg("jam", 0, 29), seg("hand", 0, 25)])])
    assert choose_windows(long)["window_s"] >= 8.0  # events of 25-29 s: long windows lose nothing
    empty = Snapshot(labels=labels, videos=[corrected("a", [])])
    assert choose_windows(empty) == {"window_s": 4.0, "stride_s": 2.0}


def test_unset_windows_come_from_the_version_and_explicit_ones_win():
    recorded = {"window_s": 2.0, "stride_s": 1.0}
    assert PrelabelSettings().resolved(recorded).window_s == 2.0
    assert PrelabelSettings().resolved(recorded).stride_s == 1.0
    assert (PrelabelSettings().resolved().window_s, PrelabelSettings().resolved().stride_s) == (4.0, 2.0)
    mine = PrelabelSettings(window_s=6.0).resolved(recorded)
    assert (mine.window_s, mine.stride_s) == (6.0, 3.0)
    both = PrelabelSettings(window_s=6.0, stride_s=1.5).resolved(recorded)
    assert (both.window_s, both.stride_s) == (6.0, 1.5)


def test_accumulation_keeps_earlier_corrections_newest_first_and_what_each_video_was_checked_for():
    first = Snapshot(
        labels=parse_labels(["jam"]), videos=[corrected("a", [seg("jam", 1, 3)]), corrected("b", [])]
    ).frozen()
    second = Snapshot(
        labels=parse_labels(["jam: the belt stops", "hand"]),
        videos=[corrected("b", [seg("jam", 4, 8)]), corrected("c", [seg("hand", 2, 3)])],
    ).frozen()
    both = accumulate(first, second)
    by_id = {v.video_id: v for v in both.videos}
    assert sorted(by_id) == ["a", "b", "c"]
    assert [s.start_s for s in by_id["b"].segments] == [4.0]  # corrected again: the newest correction
    assert [x.name for x in both.labels] == ["jam", "hand"] and both.labels[0].description == "the belt stops"
    assert by_id["a"].labels == ["jam"] and not by_id["a"].checked_for("hand")  # nobody checked it for hands
    assert by_id["c"].labels is None and by_id["c"].checked_for("hand")
    assert accumulate(first, second).id == both.id and accumulate(None, second).id == second.id


def test_a_rare_labels_threshold_is_tuned_to_where_its_windows_rank_well():
    """P(yes) of 'hand' peaks at 0.3 on its windows: at 0.5 it is never detected; the tuned threshold finds
    it, and 'jam', clear at 0.9, keeps a threshold near the middle."""
    from workers.events import covered_share, windows
    from workers.rounds.evaluation import evaluate
    from workers.rounds.run import THRESHOLDS, tune_thresholds
    from workers.schemas import PrelabelResult, VideoMeta

    spans = windows(30.0, 2.0, 1.0)
    gt, results = {}, {}
    for i in range(4):
        events = [seg("hand", 5.0 + i, 9.0 + i), seg("jam", 15.0, 21.0 + i)]
        probs = {
            "hand": [0.05 + 0.25 * covered_share(events[:1], a, b) for a, b in spans],
            "jam": [0.05 + 0.9 * covered_share(events[1:], a, b) for a, b in spans],
        }
        gt[f"v{i}"] = events
        results[f"v{i}"] = PrelabelResult(
            video=f"v{i}",
            model_version="r",
            meta=VideoMeta(fps=10.0, n_frames=300, duration=30.0),
            windows=spans,
            window_probs=probs,
        )
    p = PrelabelSettings().resolved()
    tuned = tune_thresholds(results, gt, ["hand", "jam"], p)
    assert tuned["hand"] < 0.3 and 0.2 <= tuned["jam"] <= 0.7

    from workers.jobs import result_segments

    def ap(settings: PrelabelSettings, label: str) -> float:
        preds = {k: result_segments(r, [label], settings) for k, r in results.items()}
        return evaluate(preds, gt, thresholds=(0.5,), labels=[label]).map_at(0.5)

    assert ap(p, "hand") == 0.0 and ap(p.model_copy(update={"thresholds": tuned}), "hand") == 1.0
    # smoothing over neighbours: none is the plain argmax; over every threshold, all score alike and 0.5 wins
    assert tune_thresholds(results, gt, ["hand", "jam"], p, smooth=0) == tuned
    assert tune_thresholds(results, gt, ["hand", "jam"], p, smooth=len(THRESHOLDS)) == {
        "hand": 0.5,
        "jam": 0.5,
    }


def test_threshold_tuning_scores_a_bounded_stable_set_of_training_videos():
    from workers.rounds.run import tuning_videos

    counts = {f"v{i}": 29 for i in range(40)}
    chosen = tuning_videos(counts, 256)
    assert len(chosen) == 8  # 8 x 29 = 232 windows, a ninth would pass 256
    grown = tuning_videos(counts | {f"w{i}": 29 for i in range(400)}, 256)
    assert len(grown) == 8  # ten times the corrections: the same cost
    assert [v for v in grown if v.startswith("v")] == [v for v in chosen if v in grown]  # the order is stable
    assert tuning_videos({"long": 5000}, 256) == ["long"] and tuning_videos(counts, 0) == []
