"""Fine-tune rounds and the model registry, in process with a tiny model."""

from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch

from workers.events import covered_share, windows
from workers.rounds.corrections import snapshot_from_ground_truth, split_ids, split_of
from workers.rounds.registry import ModelStore, RegistryError, RoundRunning
from workers.rounds.run import RoundSettings, init_store, run_round, window_examples
from workers.schemas import PrelabelSettings, Segment, TrainSettings, parse_labels
from workers.tools.linevideo import generate_dataset

LABELS = parse_labels(["empty_line: the conveyor is empty", "hand: a hand reaches into the frame"])


def quick_settings(**train) -> RoundSettings:
    return RoundSettings(
        train=TrainSettings(**{"steps": 6, "batch_size": 4, "lr": 1e-2, "checkpoint_every": 3, **train}),
        prelabel=PrelabelSettings(window_s=2.0, stride_s=1.0, frames_per_window=2, global_frames=4),
        validation_fraction=0.34,
        dtype="fp32",
    )


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    d = tmp_path_factory.mktemp("corrections")
    generate_dataset(d, 6, seed=320, duration=8.0)  # ids hash to 4 train + 2 validation videos
    return snapshot_from_ground_truth(d / "ground_truth.jsonl", LABELS)


@pytest.fixture()
def store(tmp_path, tiny_spec):
    s = ModelStore(tmp_path / "store")
    init_store(s, tiny_spec)
    return s


def test_split_is_deterministic_and_stable():
    ids = [f"video-{i}" for i in range(400)]
    a = [split_of(i) for i in ids]
    assert a == [split_of(i) for i in ids]
    assert 0.15 < a.count("validation") / len(a) < 0.35


def test_a_small_snapshot_always_splits_into_both_sides():
    for n in range(2, 9):
        for start in range(0, 200, 7):
            ids = [f"task-{start + k}" for k in range(n)]
            train, val = split_ids(ids)
            assert train and val and sorted(train + val) == sorted(ids)
    assert split_ids(["only"]) in ((["only"], []), ([], ["only"]))
    big = [f"video-{i}" for i in range(400)]
    assert split_ids(big)[1] == [i for i in big if split_of(i) == "validation"]  # the hash split as it is


def test_validation_gets_a_minimum_of_videos_and_keeps_them_as_the_snapshot_grows():
    """12 ids whose hashes put 1 in validation (as the second event set's did) get 3; a snapshot that grows
    past the minimum's size never draws a video that trained into validation."""
    for start in range(0, 3000, 12):
        ids = [f"clip-{start + k}" for k in range(12)]
        if sum(split_of(i) == "validation" for i in ids) <= 1:
            break
    train, val = split_ids(ids)
    assert len(val) == 3 and sorted(train + val) == sorted(ids)
    assert set(val) >= {i for i in ids if split_of(i) == "validation"}
    assert len(split_ids(ids, min_validation=1)[1]) == 1  # the hash split, or its one lowest-hash video
    assert len(split_ids(ids[:6])[1]) >= 2 and len(split_ids(ids[:4])[1]) >= 1
    for start in range(0, 400, 5):
        pool = [f"v-{start + k}" for k in range(40)]
        trained: set[str] = set()
        for n in range(9, 41):  # from the size where the minimum is 3 on, every round adds one video
            train, val = split_ids(pool[:n])
            assert not trained & set(val)
            trained |= set(train)


def test_snapshot_id_depends_only_on_content(snapshot, tmp_path):
    again = snapshot.model_copy(update={"id": ""}).frozen()
    assert again.id == snapshot.id
    changed = snapshot.model_copy(update={"labels": LABELS[:1], "id": ""}).frozen()
    assert changed.id != snapshot.id


def test_window_targets_come_from_overlap_with_corrected_segments():
    segs = [Segment(label="hand", start_s=1.0, end_s=3.0, first_frame=11, last_frame=30)]
    assert covered_share(segs, 0.0, 2.0) == pytest.approx(0.5)
    assert covered_share(segs, 4.0, 6.0) == 0.0
    assert covered_share(
        segs + [Segment(label="hand", start_s=2.0, end_s=5.0, first_frame=21, last_frame=50)], 0.0, 4.0
    ) == pytest.approx(0.75)


def test_window_examples_label_each_window_yes_or_no(snapshot):
    ex = window_examples(snapshot, [snapshot.videos[0].video_id], quick_settings())
    assert {a for _, _, _, a, _ in ex} <= {"yes", "no"}
    assert {q for _, _, q, _, _ in ex} <= {label.question() for label in LABELS}


def test_a_round_records_a_version_and_promotes_only_when_better(store, snapshot):
    result = run_round(store, snapshot, quick_settings())
    reg = store.read()
    info = reg["versions"]["round-1"]
    assert info["parent"] == "base" and info["snapshot"] == snapshot.id
    assert set(info["metrics"]["validation"]) >= {"mAP@0.5", "mAP", "per_label_AP@0.5"}
    assert reg["serving"] == ("round-1" if result.promoted else "base")
    gate = info["gate"]
    assert result.promoted == gate["promote"] and result.reason == gate["reason"]
    assert gate["gain"] == pytest.approx(
        result.metrics["candidate"]["mAP@0.5"] - result.metrics["serving"]["mAP@0.5"], abs=1e-3
    )
    assert gate["interval"][0] <= gate["gain"] <= gate["interval"][1] or gate["interval"] == [-1.0, 1.0]
    assert info["windows"] == {"window_s": 2.0, "stride_s": 1.0}  # the settings' own
    assert (store.root / info["snapshot_path"]).exists()
    assert set(result.timings) == {"collect_s", "train_s", "evaluate_s"}


def test_a_training_run_at_chance_is_judged_diverged_and_a_learning_one_is_not():
    from workers.rounds.run import diverged

    learning = [{"ce": 0.69 - 0.006 * k} for k in range(100)]
    stuck = [{"ce": 0.69 - 0.006 * k} for k in range(25)] + [{"ce": 0.74}] * 75  # rose back above chance
    assert not diverged(learning) and diverged(stuck)
    assert not diverged(stuck, answer_choices=False)  # a full-vocabulary cross-entropy has another chance
    assert not diverged(stuck[-6:])  # too short to judge
    assert diverged(learning[:-2] + [{"ce": math.nan}] * 2)  # a loss gone to NaN is no lesson learned


def test_a_run_that_answers_every_window_alike_is_judged_diverged_even_below_chance():
    from workers.rounds.run import diverged

    # soft targets whose video-blind answer (each label's base rate) scores 0.61: a run ending at 0.60 is
    # below ln 2 but learned nothing from the pictures; one ending at 0.40 did
    flat = [{"ce": 0.60, "blind_ce": 0.61}] * 100
    learned = [{"ce": 0.40, "blind_ce": 0.61}] * 100
    assert diverged(flat) and not diverged(learned)
    assert not diverged([{"ce": 0.60}] * 100)  # a run without the record is judged against ln 2


def test_the_video_blind_cross_entropy_is_what_each_questions_mean_target_scores():
    from workers.stllm.train import input_blind_ce

    balanced = [([(0, 0), (0, 1)], ["a"], [[1.0], [0.0]])] * 3
    assert input_blind_ce(balanced) == pytest.approx([math.log(2)] * 3)
    # question a: targets 0.2 / 0.2 (mean 0.2); b: 1 / 0 / -1 (no answer, left out; mean 0.5)
    batches = [([(0, 0), (0, 1)], ["a", "b"], [[0.2, 1.0], [0.2, 0.0]]), ([(0, 2)], ["b"], [[-1.0]])]
    h = -(0.2 * math.log(0.2) + 0.8 * math.log(0.8))
    assert input_blind_ce(batches) == pytest.approx([(2 * h + 2 * math.log(2)) / 4, math.log(2)])


def test_a_round_whose_training_diverges_starts_again_at_another_seed_and_half_the_rate(store, snapshot):
    # a learning rate no run survives (at 50 a run sometimes ends below chance by luck; at 1e4 none does):
    # every attempt ends at or above the video-blind answer's level or in NaN (its final_ce None), and each
    # one is on the record
    result = run_round(store, snapshot, quick_settings(steps=8, lr=1e4))
    attempts = store.read()["versions"][result.version]["attempts"]
    assert [(a["seed"], a["lr"]) for a in attempts] == [(0, 1e4), (1, 5e3)]
    assert all(a["diverged"] for a in attempts)
    assert all(a["blind_ce"] > 0 for a in attempts)  # what a video-blind answer scores, recorded
    assert all(a["final_ce"] is None or a["final_ce"] >= 0.95 * a["blind_ce"] for a in attempts)
    assert not result.promoted and "did not learn" in result.reason  # held, whatever it measures


def test_a_forced_round_is_served_and_rollback_restores_the_earlier_version(store, snapshot):
    s = quick_settings()
    s.force = True
    run_round(store, snapshot, s)
    assert store.serving()[0] == "round-1"
    store.set_serving("base", "rollback")
    assert store.serving()[0] == "base"
    assert store.read()["history"][-1]["why"] == "rollback"
    with pytest.raises(RegistryError):
        store.set_serving("round-9", "typo")


def test_a_failure_mid_training_leaves_serving_unchanged(store, snapshot, monkeypatch):
    before = json.loads(store.registry_path.read_text())
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def failing_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("injected failure at step 4")
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", failing_step)
    with pytest.raises(RuntimeError, match="injected"):
        run_round(store, snapshot, quick_settings())
    assert json.loads(store.registry_path.read_text()) == before
    assert not (store.root / "versions" / "round-1").exists()
    _assert_lock_free(store)
    # the checkpoint at step 3 survives: the rerun resumes and finishes
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert (store.root / "work" / "round-1" / "checkpoint.pt").exists()
    run_round(store, snapshot, quick_settings())
    assert "round-1" in store.read()["versions"]


def test_a_videos_side_follows_its_content_not_its_path(tmp_path):
    """A video moved or copied to another folder keeps its key (and so its side); another video does not
    share it; a URL or a missing file is its own key."""
    from workers.rounds.corrections import video_key

    a, b = tmp_path / "a" / "v.mp4", tmp_path / "b" / "moved.mp4"
    for p in (a, b):
        p.parent.mkdir()
    a.write_bytes(bytes(range(256)) * 1000)
    b.write_bytes(a.read_bytes())
    other = tmp_path / "other.mp4"
    other.write_bytes(a.read_bytes()[:-1] + b"x")
    assert video_key(str(a)) == video_key(str(b)) != video_key(str(other))
    assert video_key("https://host/v.mp4") == "https://host/v.mp4"
    assert video_key(str(tmp_path / "gone.mp4")) == str(tmp_path / "gone.mp4")


def test_one_file_never_lands_on_both_sides_of_the_split():
    """Corrections of several tasks or samples on one video file are grouped: all train or all validation."""
    ids = [f"task-{i}" for i in range(60)]
    files = {i: f"/videos/v{int(i.split('-')[1]) // 3}.mp4" for i in ids}  # three tasks per file
    train, val = split_ids(ids, 0.25, group=files.__getitem__)
    assert sorted(train + val) == sorted(ids) and train and val
    assert not {files[i] for i in train} & {files[i] for i in val}
    two = ["a", "b"]  # a small snapshot of one file stays on one side
    assert split_ids(two, 0.25, group=lambda i: "/same.mp4") in ((two, []), ([], two))


def test_a_second_concurrent_round_is_refused(store, snapshot):
    with store.round_lock("round-1"):
        with pytest.raises(RoundRunning, match="round-1 is running"):
            run_round(store, snapshot, quick_settings())
    _assert_lock_free(store)
    assert "round-1" not in store.read()["versions"]


def _assert_lock_free(store) -> None:
    with store.round_lock("check"):
        pass


def _hold_lock(root: str, ready, name: str) -> None:
    from workers.rounds.registry import ModelStore

    with ModelStore(root).round_lock(name):
        ready.set()
        time.sleep(600)


def _try_lock(root: str, start, out) -> None:
    from workers.rounds.registry import ModelStore, RoundRunning

    start.wait()  # a barrier: every racer is up before any tries, however slowly the machine starts them
    try:
        with ModelStore(root).round_lock("racer"):
            out.put(1)
            time.sleep(2)
    except RoundRunning:
        out.put(0)


def test_the_round_lock_is_released_by_process_death_and_never_shared(store):
    """flock on a held descriptor: a SIGKILLed holder frees it at once; racing processes get it one at a time."""
    import multiprocessing
    import signal

    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(store.root), ready, "round-7"))
    holder.start()
    assert ready.wait(60)
    with pytest.raises(RoundRunning, match=f"round-7 is running .*pid {holder.pid}"):
        _assert_lock_free(store)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(30)
    _assert_lock_free(store)  # no stale lock to take over
    start, out = ctx.Barrier(4), ctx.Queue()
    racers = [ctx.Process(target=_try_lock, args=(str(store.root), start, out)) for _ in range(4)]
    for r in racers:
        r.start()
    wins = sum(out.get(timeout=60) for _ in racers)
    for r in racers:
        r.join(30)
    assert wins == 1


def test_same_snapshot_and_seed_give_the_same_adapter(tmp_path, tiny_spec, snapshot):
    from safetensors.torch import load_file

    adapters = []
    for i in range(2):
        s = ModelStore(tmp_path / f"s{i}")
        init_store(s, tiny_spec)
        settings = quick_settings()
        settings.force = True
        run_round(s, snapshot, settings)
        adapters.append(load_file(s.version_dir("round-1") / "adapter" / "adapter_model.safetensors"))
    assert adapters[0].keys() == adapters[1].keys()
    for k in adapters[0]:
        torch.testing.assert_close(adapters[0][k], adapters[1][k], atol=0, rtol=0)


def test_paired_batches_ask_one_window_two_questions_with_opposite_answers():
    from workers.stllm.train import Example, TrainOptions, balanced_batches

    questions = ("is it a jam?", "is a hand in it?", "is the line empty?")
    examples = [  # every window: one question answered yes, two no
        Example(v, w, q, "yes" if k == (v + w) % 3 else "no")
        for v in range(3)
        for w in range(10)
        for k, q in enumerate(questions)
    ]
    opts = dict(lr=1e-3, warmup_steps=0, weight_decay=0.0, masking=True, mvm=True, seed=3)
    opts |= dict(checkpoint_every=10, answer_choices=True)
    batches = balanced_batches(examples, TrainOptions(steps=20, batch_size=8, paired=True, **opts))
    pairs = [(b[k], b[k + 1]) for b in batches for k in range(0, 8, 2)]
    assert all(len(b) == 8 for b in batches)
    assert all((a.video, a.window) == (b.video, b.window) and a.question != b.question for a, b in pairs)
    assert all({a.answer, b.answer} == {"yes", "no"} for a, b in pairs)
    plain = balanced_batches(examples, TrainOptions(steps=20, batch_size=8, paired=False, **opts))
    assert plain != batches and all(len(b) == 8 for b in plain)


def test_question_batches_ask_every_window_every_question_with_its_own_answer():
    from workers.stllm.train import Example, TrainOptions, question_batches

    questions = ("is it a jam?", "is a hand in it?", "is the line empty?")
    examples = [
        Example(v, w, q, "yes" if k == (v + w) % 3 else "no")
        for v in range(3)
        for w in range(10)
        for k, q in enumerate(questions)
        if (v, w, k) != (1, 4, 2)  # one unclear target: no answer for it
    ]
    answer = {(e.video, e.window, e.question): e.answer for e in examples}
    opts = dict(lr=1e-3, warmup_steps=0, weight_decay=0.0, masking=True, mvm=True, seed=3, paired=True)
    opts |= dict(checkpoint_every=10, answer_choices=True)
    batches = question_batches(examples, TrainOptions(steps=30, batch_size=4, **opts))
    assert len(batches) == 30
    for keys, qs, targets in batches:
        assert len(keys) == 4 and sorted(qs) == sorted(questions)  # 3 questions < questions_per_step
        for (v, w), row in zip(keys, targets, strict=True):
            for q, t in zip(qs, row, strict=True):
                want = answer.get((v, w, q))
                assert t == {"yes": 1.0, "no": 0.0, None: -1.0}[want]  # P(yes) to train toward
        assert any(0.0 in row for row in targets) and any(1.0 in row for row in targets)
    capped = question_batches(examples, TrainOptions(steps=5, batch_size=4, questions_per_step=2, **opts))
    assert all(len(qs) == 2 for _, qs, _ in capped)
    partial = [Example(e.video, e.window, e.question, e.answer, 0.3) for e in examples]
    soft = question_batches(partial, TrainOptions(steps=5, batch_size=4, **opts))
    assert {t for _, _, rows in soft for row in rows for t in row} <= {0.3, -1.0}
    hard = question_batches(partial, TrainOptions(steps=5, batch_size=4, soft_targets=False, **opts))
    assert {t for _, _, rows in hard for row in rows for t in row} <= {0.0, 1.0, -1.0}


def test_partly_covered_windows_train_toward_their_covered_share(snapshot):
    """Soft targets (the default): every window of a checked label trains; one its events cover in part
    (between no_overlap and yes_overlap) is a no whose target is that share; off, only clear windows train."""
    video = snapshot.videos[0]
    soft = window_examples(snapshot, [video.video_id], quick_settings())
    hard = window_examples(snapshot, [video.video_id], quick_settings(soft_targets=False))
    p = quick_settings().prelabel.resolved()
    spans = windows(video.duration, p.window_s, p.stride_s)
    question = {label.question(): label.name for label in LABELS}
    for _, w, q, a, t in soft:
        share = covered_share([x for x in video.segments if x.label == question[q]], *spans[w])
        assert a == ("yes" if share >= 0.5 else "no")
        assert t == (pytest.approx(share) if 0 < share < 0.5 else None)
    assert len(soft) == len(spans) * len(LABELS) > len(hard)
    assert any(t is not None and 0 < t < 0.5 for *_, t in soft)  # the fixture has partly covered windows
    assert all(t is None for *_, t in hard)
    assert {(v, w, q, a) for v, w, q, a, _ in hard} <= {(v, w, q, a) for v, w, q, a, _ in soft}


def test_a_round_suggests_the_next_videos_to_correct_and_never_a_corrected_one(store, snapshot, tmp_path):
    fresh = generate_dataset(tmp_path / "pool", 3, seed=330, duration=6.0)
    pool = [r["video"] for r in fresh]
    corrected = snapshot.videos[0].video
    result = run_round(
        store,
        snapshot,
        quick_settings().model_copy(update={"next_batch": 2}),
        candidates=[*pool, corrected, str(tmp_path / "pool" / "missing.mp4")],
    )
    picked = [x["video"] for x in result.next_batch]
    assert len(picked) == 2 and set(picked) <= set(pool) and corrected not in picked
    for x in result.next_batch:
        assert 0.0 <= x["uncertainty"] <= 1.0 and x["label"] in {"empty_line", "hand"}
    assert store.read()["versions"][result.version]["next_batch"] == result.next_batch
    # nothing left to suggest: every candidate is corrected already
    again = run_round(
        store, snapshot, quick_settings().model_copy(update={"next_batch": 2}), candidates=[corrected]
    )
    assert again.next_batch == []


def test_a_round_without_windows_chooses_them_from_the_corrections_and_its_version_serves_with_them(
    tmp_path, tiny_spec, snapshot
):
    from workers.jobs import prelabel_videos
    from workers.rounds.corrections import choose_windows
    from workers.stllm.io import load_model

    s = ModelStore(tmp_path / "store")
    init_store(s, tiny_spec)
    settings = quick_settings()
    settings.prelabel = PrelabelSettings(frames_per_window=2, global_frames=4)
    settings.force = True
    run_round(s, snapshot, settings)
    chosen = choose_windows(snapshot)
    info = s.read()["versions"]["round-1"]
    assert info["windows"] == chosen and info["settings"]["prelabel"]["window_s"] == chosen["window_s"]
    model = load_model(s.version_dir("round-1"))
    assert {
        k: model.prelabel_defaults[k] for k in chosen
    } == chosen and "thresholds" in model.prelabel_defaults
    (result,) = prelabel_videos(
        model, [snapshot.videos[0].video], LABELS, PrelabelSettings(frames_per_window=2)
    )
    starts = [a for a, _ in result.windows]
    assert starts[1] - starts[0] == pytest.approx(chosen["stride_s"])
    assert result.windows[0][1] - result.windows[0][0] == pytest.approx(chosen["window_s"])


def test_round_two_trains_on_round_ones_corrections_too(tmp_path, tiny_spec, snapshot):
    s = ModelStore(tmp_path / "store")
    init_store(s, tiny_spec)
    first = snapshot.model_copy(update={"videos": snapshot.videos[:3], "id": ""}).frozen()
    second = snapshot.model_copy(update={"videos": snapshot.videos[3:], "id": ""}).frozen()
    settings = quick_settings(steps=2)
    settings.force = True
    run_round(s, first, settings)
    run_round(s, second, settings)
    versions = s.read()["versions"]
    frozen = json.loads((s.root / versions["round-2"]["snapshot_path"]).read_text())
    assert {v["video_id"] for v in frozen["videos"]} == {v.video_id for v in snapshot.videos}
    # by default a round trains on from the served version
    assert versions["round-2"]["trained_from"] == "round-1" and versions["round-2"]["parent"] == "round-1"
    settings.accumulate = False
    settings.train_from = "base"
    run_round(s, second, settings)
    third = s.read()["versions"]["round-3"]
    assert len(json.loads((s.root / third["snapshot_path"]).read_text())["videos"]) == 3
    assert third["trained_from"] == "base"


def test_a_later_round_keeps_the_served_windows_unless_the_events_call_for_other_ones(
    tmp_path, tiny_spec, snapshot
):
    from workers.rounds.corrections import choose_windows

    s = ModelStore(tmp_path / "store")
    init_store(s, tiny_spec)
    settings = quick_settings(steps=2)
    settings.prelabel = PrelabelSettings(frames_per_window=2, global_frames=4)
    settings.force = True
    run_round(s, snapshot, settings)
    first = s.read()["versions"]["round-1"]["windows"]
    assert first == choose_windows(snapshot)
    # events a little longer: the served windows stay
    longer = snapshot.model_copy(
        update={
            "id": "",
            "videos": [
                v.model_copy(
                    update={"segments": [x.model_copy(update={"end_s": x.end_s + 0.3}) for x in v.segments]}
                )
                for v in snapshot.videos
            ],
        }
    ).frozen()
    settings.accumulate = False
    run_round(s, longer, settings)
    assert s.read()["versions"]["round-2"]["windows"] == first
    # events four times as long: new windows
    stretched = snapshot.model_copy(
        update={
            "id": "",
            "videos": [
                v.model_copy(
                    update={
                        "duration": v.duration * 4,
                        "segments": [
                            x.model_copy(update={"start_s": x.start_s * 4, "end_s": x.end_s * 4})
                            for x in v.segments
                        ],
                    }
                )
                for v in snapshot.videos
            ],
        }
    ).frozen()
    assert choose_windows(stretched)["window_s"] >= 1.5 * first["window_s"]


def test_a_round_on_the_scene_videos_learns_what_the_base_model_does_not(tmp_path, tiny_spec):
    """The second, differently made event set (real footage, other events, sizes and frame rates): a round
    from its corrections separates blackout windows on held-out scene videos that the base model cannot."""
    from workers.jobs import prelabel_videos
    from workers.rounds.evaluation import window_auc
    from workers.stllm.io import load_model
    from workers.tools.scenevideo import SCENE_DESCRIPTIONS, generate_scene_dataset

    labels = parse_labels([f"{k}: {SCENE_DESCRIPTIONS[k]}" for k in ("blackout", "crossing")])
    generate_scene_dataset(tmp_path / "corrections", 6, seed=41, duration=(20.0, 26.0))
    heldout = generate_scene_dataset(tmp_path / "heldout", 2, seed=42, duration=(20.0, 26.0))
    gt = {r["video"]: [Segment.model_validate(s) for s in r["segments"]] for r in heldout}
    store = ModelStore(tmp_path / "store")
    init_store(store, tiny_spec)
    snap = snapshot_from_ground_truth(tmp_path / "corrections" / "ground_truth.jsonl", labels)
    # the rounds' own learning rate: the tests' 1e-2 made this round a coin flip across CPUs and thread counts
    s = quick_settings(steps=60, seed=0, lr=TrainSettings().lr)
    s.prelabel = PrelabelSettings(frames_per_window=2, global_frames=4)  # the round chooses its windows
    s.force = True
    result = run_round(store, snap, s)

    def blackout_auc(version: str) -> float:
        model = load_model(store.version_dir(version), dtype="fp32")
        results = prelabel_videos(model, list(gt), labels, s.prelabel)
        assert all(r.error is None for r in results)
        spans = {r.video: [tuple(w) for w in r.windows] for r in results}
        return window_auc(spans, {r.video: r.window_probs for r in results}, gt, ["blackout"])["blackout"]

    base, learned = blackout_auc("base"), blackout_auc(result.version)
    assert learned >= 0.85 and learned >= base + 0.2, (base, learned)
