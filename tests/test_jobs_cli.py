"""Pre-label and ask jobs on generated line videos with a tiny model, and the stllm command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from workers.jobs import ask_videos, prelabel_videos
from workers.schemas import AskSettings, PrelabelSettings, parse_labels
from workers.tools.linevideo import generate_dataset


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("lines")
    records = generate_dataset(d, 3, seed=7, duration=(8.0, 14.0))
    bad = d / "corrupt.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 8)
    return [r["video"] for r in records], str(bad)


LABELS = parse_labels(["jam: the conveyor stopped", "hand", "defect"])


def test_prelabel_gives_segments_per_label_with_versions_and_frames(tiny_model, videos):
    good, _ = videos
    settings = PrelabelSettings(
        window_s=2.0, stride_s=1.0, frames_per_window=2, global_frames=4, high=0.0, low=0.0
    )
    results = prelabel_videos(tiny_model, good, LABELS, settings)
    assert [r.video for r in results] == good
    for r in results:
        assert r.error is None and r.model_version == tiny_model.version
        # thresholds at 0: every label is on over the whole video, as one merged segment
        assert sorted(s.label for s in r.segments) == ["defect", "hand", "jam"]
        for s in r.segments:
            assert s.first_frame == 1 and s.last_frame == r.meta.n_frames
            assert 0.0 < s.score < 1.0
        assert set(r.window_probs) == {"jam", "hand", "defect"}
        assert len(r.window_probs["jam"]) == len(r.windows)


def test_a_corrupt_video_fails_alone(tiny_model, videos):
    good, bad = videos
    seen = []
    results = prelabel_videos(tiny_model, [good[0], bad, good[1]], LABELS, progress=seen.append)
    assert [r.error is None for r in results] == [True, False, True]
    assert bad in results[1].error and "not a readable video" in results[1].error
    assert len(seen) == 3


def test_window_probabilities_do_not_depend_on_batching(tiny_model, videos):
    good, _ = videos
    a = prelabel_videos(tiny_model, good[:1], LABELS, PrelabelSettings(window_batch=1))[0]
    b = prelabel_videos(tiny_model, good[:1], LABELS, PrelabelSettings(window_batch=64))[0]
    for label in a.window_probs:
        assert a.window_probs[label] == pytest.approx(b.window_probs[label], abs=1e-4)


def test_windows_of_several_videos_batched_together_score_as_each_alone(tiny_model, videos):
    good, _ = videos
    together = prelabel_videos(tiny_model, good, LABELS, PrelabelSettings(window_batch=64))
    alone = [prelabel_videos(tiny_model, [v], LABELS, PrelabelSettings(window_batch=1))[0] for v in good]
    for a, b in zip(together, alone, strict=True):
        assert a.video == b.video and a.windows == b.windows
        for label in a.window_probs:
            assert a.window_probs[label] == pytest.approx(b.window_probs[label], abs=1e-4)


def test_a_video_that_breaks_the_model_in_a_batched_group_fails_alone(tiny_model, videos, monkeypatch):
    import workers.jobs as jobs

    good, _ = videos
    decode = jobs.decode_windows

    def two_channel_frames(path, *args, **kwargs):
        d = decode(path, *args, **kwargs)
        if path == good[1]:  # decodes fine, then the encoder rejects its frames
            d.frames = d.frames[..., :2]
        return d

    monkeypatch.setattr(jobs, "decode_windows", two_channel_frames)
    seen = []
    results = prelabel_videos(
        tiny_model, good, LABELS, PrelabelSettings(window_batch=64), progress=seen.append
    )
    assert [r.error is None for r in results] == [True, False, True]
    assert results[1].video == good[1] and results[1].error
    assert [r.video for r in seen] == good


def test_ask_answers_with_p_yes_and_a_moment(tiny_model, videos):
    good, bad = videos
    results = ask_videos(tiny_model, [good[0], bad], "Is the line jammed?", AskSettings(max_new_tokens=4))
    r = results[0]
    assert r.error is None and isinstance(r.answer, str) and 0.0 <= r.p_yes <= 1.0
    assert 1 <= r.moment.first_frame <= r.moment.last_frame <= r.meta.n_frames
    assert results[1].error and bad in results[1].error
    open_q = ask_videos(tiny_model, [good[0]], "What happens on the line?", AskSettings(max_new_tokens=2))[0]
    assert open_q.p_yes is None and open_q.moment is not None
    with pytest.raises(ValueError):
        ask_videos(tiny_model, good, "  ")


def _stllm(*args, check=True):
    # the embedded default: no broker, whatever another test module configured for the pool
    env = {k: v for k, v in os.environ.items() if k != "STLLM_BROKER_URL"}
    out = subprocess.run(
        [sys.executable, "-m", "workers.cli", *args], capture_output=True, text=True, env=env
    )
    if check and out.returncode != 0:
        raise AssertionError(f"stllm {' '.join(args)} exited {out.returncode}:\n{out.stderr}")
    return out


def test_cli_prelabel_writes_one_json_line_per_video(model_dir, videos):
    good, bad = videos
    out = _stllm(
        "prelabel",
        good[0],
        bad,
        "--labels",
        "jam",
        "hand: a hand enters",
        "--model",
        model_dir,
        "--dtype",
        "fp32",
    )
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert [x["video"] for x in lines] == [good[0], bad]
    assert lines[0]["error"] is None and lines[0]["model_version"] == "tiny@base"
    assert lines[1]["error"] and bad in lines[1]["error"]


def test_cli_exits_non_zero_only_when_nothing_could_be_processed(model_dir, videos):
    _, bad = videos
    out = _stllm("prelabel", bad, "--labels", "jam", "--model", model_dir, check=False)
    assert out.returncode == 1 and json.loads(out.stdout)["error"]
    out = _stllm("prelabel", bad, "--labels", "jam", "jam", "--model", model_dir, check=False)
    assert out.returncode == 2 and "duplicate labels" in out.stderr


def test_cli_ask_generate_and_evaluate(model_dir, tmp_path):
    _stllm("generate", str(tmp_path / "v"), "--count", "2", "--duration", "6")
    gt = tmp_path / "v" / "ground_truth.jsonl"
    videos = [json.loads(x)["video"] for x in gt.read_text().splitlines()]
    ask = _stllm("ask", videos[0], "-q", "Is a hand in the frame?", "--model", model_dir)
    assert 0 <= json.loads(ask.stdout)["p_yes"] <= 1
    pre = _stllm("prelabel", *videos, "--labels", "jam", "hand", "--model", model_dir)
    (tmp_path / "p.jsonl").write_text(pre.stdout)
    report = json.loads(_stllm("evaluate", str(tmp_path / "p.jsonl"), str(gt)).stdout)
    assert 0.0 <= report["mAP@0.5"] <= 1.0


def test_cli_help_teaches():
    out = _stllm("--help").stdout
    for word in ("prelabel", "ask", "generate", "evaluate", "demo", "builtin", "examples"):
        assert word in out


def test_prefetch_reads_its_items_one_ahead_so_a_generator_can_stop_the_run():
    from workers.jobs import prefetch

    taken = []

    def items():
        for i in range(10):
            taken.append(i)
            yield i

    run = prefetch(items(), lambda i: i * i)
    assert next(run) == (0, 0) and taken == [0, 1]  # the next item's work is under way meanwhile
    assert list(run)[-1] == (9, 81) and taken == list(range(10))
    assert list(prefetch(iter([]), lambda i: i)) == []


def test_low_priority_prefetch_runs_its_work_in_a_niced_thread():
    import os
    import threading

    from workers.jobs import prefetch

    def work(i: int) -> tuple[int, int]:
        return i * i, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    out = list(prefetch(range(4), work, low_priority=True))
    assert [(i, r[0]) for i, r in out] == [(i, i * i) for i in range(4)]
    assert {r[1] for _, r in out} == {19}  # the thread's own nice value
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before  # the caller's is unchanged
    assert {r[1] for _, r in prefetch(range(2), work)} == {before}


def test_ask_encodes_each_videos_frames_once(tiny_model, videos, monkeypatch):
    good, _ = videos
    calls = []
    encode = tiny_model.frame_features
    monkeypatch.setattr(
        tiny_model, "frame_features", lambda frames, *a: calls.append(len(frames)) or encode(frames, *a)
    )
    r = ask_videos(tiny_model, good[:1], "Is the line jammed?", AskSettings(max_new_tokens=2))[0]
    assert r.error is None and len(calls) == 1


def test_a_long_video_is_streamed_with_the_same_results(tiny_model, videos, monkeypatch):
    """Past MAX_FRAMES_IN_MEMORY decoded frames a video is decoded, encoded and scored a few windows at a
    time, keeping only the global frames' features: the same probabilities and segments as all at once."""
    import numpy as np

    import workers.jobs as jobs

    good, _ = videos
    s = PrelabelSettings(window_s=2.0, stride_s=1.0)
    labels = parse_labels(["jam", "hand"])
    whole = prelabel_videos(tiny_model, good[:2], labels, s)
    reads = []
    real = jobs.read_frames
    monkeypatch.setattr(
        jobs, "read_frames", lambda path, times, **k: reads.append(len(times)) or real(path, times, **k)
    )
    monkeypatch.setattr(jobs, "MAX_FRAMES_IN_MEMORY", 12)
    streamed = prelabel_videos(tiny_model, good[:2], labels, s)
    # the global frames once per video, then parts of 3 windows (12 frames): never the whole video
    assert max(reads) <= max(12, s.global_frames) and len(reads) > 4
    for a, b in zip(whole, streamed, strict=True):
        assert b.error is None and a.windows == b.windows
        for label in ("jam", "hand"):
            assert np.allclose(a.window_probs[label], b.window_probs[label], atol=1e-4)
        assert [(x.label, x.first_frame, x.last_frame) for x in a.segments] == [
            (x.label, x.first_frame, x.last_frame) for x in b.segments
        ]
    asked = ask_videos(tiny_model, good[:1], "Is the line jammed?", AskSettings(max_new_tokens=2))[0]
    assert asked.error is None and asked.moment is not None
