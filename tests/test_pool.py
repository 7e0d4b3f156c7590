"""The Celery pool against a real redis-server and real `celery worker` processes (tiny model).

The broker (STLLM_BROKER_URL on a free port) is set in conftest.py, before ``workers.pool.app`` is imported.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from helpers import free_port

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs Debian's redis-server")

from workers.pool import client  # noqa: E402
from workers.schemas import JsonlSinkSpec  # noqa: E402
from workers.sinks import JsonlSink  # noqa: E402
from workers.tools.linevideo import generate_dataset  # noqa: E402


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("v")
    good = [r["video"] for r in generate_dataset(d, 6, seed=40, duration=6.0)]
    bad = d / "corrupt.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 4)
    return good, str(bad)


@pytest.fixture(scope="module")
def long_videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("long")
    return [r["video"] for r in generate_dataset(d, 3, seed=90, duration=60.0)]


def test_a_job_runs_on_the_pool_and_a_corrupt_video_fails_alone(workers_factory, videos, tmp_path):
    good, bad = videos
    w = workers_factory("w1")
    w.wait_ready()
    sink = JsonlSink(tmp_path / "out.jsonl")
    job = client.submit_prelabel(
        good[:3] + [bad], ["jam", "hand"], sink=JsonlSinkSpec(path=str(sink.path)), chunk_size=2
    )
    st = client.wait(job, timeout=120, poll=0.2)
    assert (st.state, st.total, st.done, st.failed) == ("SUCCESS", 4, 3, 1)
    assert any(bad in e for e in st.errors)
    rows = sink.read()
    assert sorted(r["video"] for r in rows) == sorted(good[:3] + [bad])
    assert {r["model_version"] for r in rows} == {"tiny@base"}
    assert len(client.results(job)) == 4
    assert "serves" in w.log.read_text() and "tiny@base" in w.log.read_text()


def test_two_workers_share_a_job_completely_without_overlap(workers_factory, videos, tmp_path):
    good, _ = videos
    a, b = workers_factory("wa"), workers_factory("wb")
    a.wait_ready()
    b.wait_ready()
    sink = JsonlSink(tmp_path / "out.jsonl")
    job = client.submit_prelabel(good, ["jam"], sink=JsonlSinkSpec(path=str(sink.path)), chunk_size=1)
    assert client.wait(job, timeout=180, poll=0.2).done == len(good)
    rows = sink.read()
    assert sorted(r["video"] for r in rows) == sorted(good)
    served_by = {n for n in ("wa", "wb") if "stllm.prelabel" in (tmp_path / f"{n}.log").read_text()}
    assert served_by == {"wa", "wb"}


def test_a_killed_worker_task_is_redelivered_and_completes_once(workers_factory, long_videos, tmp_path):
    victim = workers_factory("victim")
    victim.wait_ready()
    sink = JsonlSink(tmp_path / "out.jsonl")
    job = client.submit_prelabel(
        long_videos,
        ["jam", "hand", "defect"],
        sink=JsonlSinkSpec(path=str(sink.path)),
        chunk_size=len(long_videos),
    )
    deadline = time.monotonic() + 60
    while client.status(job).state == "PENDING" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.status(job).state == "RUNNING"
    victim.kill()
    killed_at = time.monotonic()
    rescuer = workers_factory("rescuer")
    rescuer.wait_ready()
    st = client.wait(job, timeout=120, poll=0.2)
    assert st.done == len(long_videos)
    rows = sink.read()
    assert sorted(r["video"] for r in rows) == sorted(long_videos)  # exactly one result per video
    assert "stllm.prelabel" in (tmp_path / "rescuer.log").read_text()
    print(f"SIGKILL to completion elsewhere: {time.monotonic() - killed_at:.1f}s")


def _pool_children(worker) -> list[int]:
    """The prefork pool processes of a worker (the OOM killer's victims: the main process lives on)."""
    main = worker.procs[0].pid
    out = []
    for pid in open(f"/proc/{main}/task/{main}/children").read().split():
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
        except OSError:
            continue
        if "spawn_main" in cmd and "resource_tracker" not in cmd:  # not multiprocessing's tracker
            out.append(int(pid))
    return out


def _wait_running(job) -> None:
    deadline = time.monotonic() + 60
    while client.status(job).state == "PENDING" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.status(job).state == "RUNNING"


def test_a_killed_pool_child_is_retried_and_every_video_finishes(workers_factory, long_videos, tmp_path):
    """SIGKILL to the prefork child only (what the OOM killer does): the task runs again on the respawned
    child, keeps what was finished and completes every video once."""
    worker = workers_factory("childkill")
    worker.wait_ready()
    sink = JsonlSink(tmp_path / "out.jsonl")
    job = client.submit_prelabel(
        long_videos, ["jam", "hand"], sink=JsonlSinkSpec(path=str(sink.path)), chunk_size=len(long_videos)
    )
    _wait_running(job)
    [child] = _pool_children(worker)
    os.kill(child, signal.SIGKILL)
    killed_at = time.monotonic()
    st = client.wait(job, timeout=240, poll=0.2)
    assert (st.done, st.failed) == (len(long_videos), 0), st
    assert sorted(r["video"] for r in sink.read()) == sorted(long_videos)
    assert worker.procs[0].poll() is None and _pool_children(worker) != [child]  # a new child, same worker
    print(f"child SIGKILL to completion: {time.monotonic() - killed_at:.1f}s")


def test_a_video_that_kills_its_process_every_time_fails_alone(workers_factory, long_videos, redis_server):
    """Each time the worker starts the poison video its process is killed: after two deaths on it, it fails
    with an error naming it and the chunk's other videos finish; nothing loops."""
    from redis import Redis as Client

    worker = workers_factory("poison")
    worker.wait_ready()
    poison = 1
    redis, kills, seen = Client(port=redis_server.port), 0, 0
    # Ledgers that earlier tests left (a cancelled job's, say) are not this job's: only its own key counts.
    earlier = set(redis.scan_iter("stllm:task:*"))
    job = client.submit_prelabel(long_videos, ["jam"], chunk_size=len(long_videos))
    _wait_running(job)
    deadline = time.monotonic() + 300
    while not client.status(job).finished and time.monotonic() < deadline:
        for key in set(redis.scan_iter("stllm:task:*")) - earlier:
            starts = int(redis.hget(key, f"a:{poison}") or 0)
            if starts > seen and not redis.hexists(key, f"r:{poison}") and starts <= 2:
                seen = starts
                for child in _pool_children(worker):
                    os.kill(child, signal.SIGKILL)
                kills += 1
        time.sleep(0.01)
    st = client.status(job)
    assert kills == 2 and (st.done, st.failed) == (len(long_videos) - 1, 1), (kills, st)
    [error] = st.errors
    assert long_videos[poison] in error and "died" in error


def test_a_job_survives_a_redis_restart_while_queued(redis_server, workers_factory, videos):
    good, _ = videos
    job = client.submit_prelabel(good[:2], ["jam"], chunk_size=1)  # queued: no worker yet
    redis_server.stop()
    redis_server.start()
    w = workers_factory("after-restart")
    w.wait_ready()
    assert client.wait(job, timeout=120, poll=0.2).done == 2


def test_a_cancelled_job_stops_taking_tasks(workers_factory, videos):
    good, _ = videos
    job = client.submit_prelabel(good, ["jam"], chunk_size=1)
    client.cancel(job)
    w = workers_factory("wc")
    w.wait_ready()
    time.sleep(2.0)
    st = client.status(job)
    assert st.state == "CANCELLED" and st.done == 0


def test_embedded_default_runs_in_process_without_a_broker(model_dir, videos):
    good, bad = videos
    code = (
        "import json; from workers.pool import client; "
        f"job = client.submit_prelabel({[good[0], bad]!r}, ['jam'], chunk_size=1); "
        "st = client.status(job); print(json.dumps([st.state, st.done, st.failed, len(client.results(job))]))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("STLLM_BROKER")}
    env.update(STLLM_MODEL=model_dir, STLLM_DTYPE="fp32")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip().splitlines()[-1] == '["SUCCESS", 1, 1, 2]'


def test_cli_submits_to_the_pool_when_a_broker_is_configured(workers_factory, videos, model_dir):
    import json

    good, bad = videos
    w = workers_factory("wcli")
    w.wait_ready()
    out = subprocess.run(
        [sys.executable, "-m", "workers.cli", "prelabel", good[0], bad, "--labels", "jam"],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ),
    )
    rows = [json.loads(x) for x in out.stdout.splitlines()]
    assert sorted(r["video"] for r in rows) == sorted([good[0], bad])
    assert {r["model_version"] for r in rows} == {"tiny@base"}  # made by the pool worker, not in process
    assert "submitted" in out.stderr


def test_one_worker_per_gpu_each_seeing_only_its_gpu():
    from workers.pool.processes import worker_commands

    cmds = worker_commands(["0", "1"], "prelabel")
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in cmds] == ["0", "1"]
    *_, (round_cmd, round_env) = worker_commands(["0", "1"], "prelabel,finetune")
    assert "workers.pool.app:round_app" in round_cmd and round_env["STLLM_WORKER_ROLE"] == "rounds"
    from workers.pool.app import app, round_app

    assert app.conf.broker_url.endswith("/0") and round_app.conf.broker_url.endswith(
        "/1"
    )  # own Redis database
    assert all("--pool-start-method=spawn" in cmd and "-c" in cmd for cmd, _ in cmds)
    ((cpu_cmd, cpu_env),) = worker_commands([], "ask,prelabel")
    assert cpu_env["CUDA_VISIBLE_DEVICES"] == "" and "ask,prelabel" in cpu_cmd


def test_a_round_on_the_finetune_queue_is_promoted_and_then_served(workers_factory, tiny_spec, tmp_path):
    from workers.rounds.corrections import snapshot_from_ground_truth
    from workers.rounds.registry import ModelStore
    from workers.rounds.run import RoundSettings, init_store
    from workers.schemas import PrelabelSettings, RoundRequest, SnapshotCorrections, TrainSettings

    store = ModelStore(tmp_path / "store")
    init_store(store, tiny_spec)
    d = tmp_path / "corrections"
    records = generate_dataset(d, 6, seed=320, duration=8.0)
    snap = snapshot_from_ground_truth(d / "ground_truth.jsonl")
    settings = RoundSettings(
        train=TrainSettings(steps=4, batch_size=4, lr=1e-2),
        prelabel=PrelabelSettings(window_s=2.0, stride_s=1.0, frames_per_window=2, global_frames=4),
        validation_fraction=0.34,
        force=True,
        dtype="fp32",
    )
    w = workers_factory("wft", queues="ask,prelabel,finetune", STLLM_MODEL_STORE=store.root)
    w.wait_ready()
    request = RoundRequest(
        corrections=SnapshotCorrections(snapshot=snap), settings=settings, store=str(store.root)
    )
    task = client.submit_round(request)
    deadline = time.monotonic() + 120
    while (state := client.round_status(task)[0]) not in (
        "SUCCESS",
        "FAILURE",
    ) and time.monotonic() < deadline:
        time.sleep(0.2)
    state, info = client.round_status(task)
    assert state == "SUCCESS", info
    assert info["version"] == "round-1" and info["promoted"]
    assert store.serving()[0] == "round-1"
    job = client.submit_prelabel([records[0]["video"]], ["jam"])
    client.wait(job, timeout=60, poll=0.2)
    assert client.results(job)[0]["model_version"] == "round-1"  # the worker switched before this task
    assert "switched from base to round-1" in w.log.read_text()
    store.set_serving("base", "rollback")
    job = client.submit_prelabel([records[0]["video"]], ["jam"])
    client.wait(job, timeout=60, poll=0.2)
    assert client.results(job)[0]["model_version"] == "base"


def test_fiftyone_operator_submits_to_the_pool_and_the_worker_writes_the_dataset(
    fiftyone, workers_factory, videos
):
    import fiftyone.operators as foo

    fo = fiftyone
    good, bad = videos
    ds = fo.Dataset()
    ds.add_samples([fo.Sample(filepath=p) for p in good[:3] + [bad]])
    w = workers_factory("wfo")  # inherits FIFTYONE_DATABASE_DIR: the same MongoDB as this process
    w.wait_ready()
    result = foo.execute_operator(
        "@stllm/labeling/prelabel_events", dataset=ds, params={"labels": ["jam"], "output_field": "pred"}
    )
    assert result.error is None and not result.delegated  # with a pool the operator returns at once
    job = result.result["job_id"]
    st = client.wait(job, timeout=120, poll=0.2)
    assert (st.done, st.failed) == (3, 1)
    ds.reload()
    assert len(ds.exists("pred")) == 3 and len(ds.exists("pred_error")) == 1
    assert {d.model_version for dets in ds.values("pred.detections") if dets for d in dets} <= {"tiny@base"}
    status = foo.execute_operator("@stllm/labeling/job_status", dataset=ds)
    assert status.result["jobs"][0]["state"] == "SUCCESS"
    ds.delete()


def test_stllm_up_starts_redis_a_worker_and_the_labelstudio_backend_and_stops_them_on_ctrl_c(
    model_dir, tmp_path
):

    port, ls_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STLLM_BROKER")}
    env.update(STLLM_MODEL=model_dir, STLLM_DTYPE="fp32")
    log = tmp_path / "up.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "workers.cli",
            "up",
            "--port",
            str(port),
            "--state",
            str(tmp_path / "state"),
            "--queues",
            "ask,prelabel",
            "--labelstudio",
            str(ls_port),
        ],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while "serves" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert f"redis://127.0.0.1:{port}/0" in log.read_text() and "serves" in log.read_text()
    from helpers import get_health

    assert get_health(ls_port, 30, log.read_text()[-3000:])["status"] == "UP"
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(60) == 0
    for p in (port, ls_port):
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", p), timeout=0.5).close()


def test_ctrl_c_is_a_clean_stop_even_when_a_child_ends_before_the_supervisor_sees_it():
    from workers.pool.processes import run_children

    # Ctrl-C reaches the whole process group; a child may end (with 0) before the supervisor's own signal
    # handler runs. Here a child signals the supervisor and ends at once, beside one that would run on.
    quick = subprocess.Popen(
        [sys.executable, "-c", "import os, signal; os.kill(os.getppid(), signal.SIGINT)"]
    )
    long = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        assert run_children([quick, long]) == 0
        assert long.poll() is not None  # stopped, not left behind
        ended = subprocess.Popen([sys.executable, "-c", "pass"])  # a child ending by itself is a failure
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        assert run_children([ended, sleeper]) == 1
    finally:  # run_children installs its handlers in this process
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


def test_broker_messages_do_not_grow_with_the_job(redis_server):
    """Each task carries its own videos and their part of the sink's mapping; what the job shares is stored
    once. 40 and 400 videos: the same message size (no worker runs: the messages stay queued)."""
    from redis import Redis as Client

    from workers.schemas import FiftyOneSinkSpec

    r = Client(port=redis_server.port)
    sizes = {}
    for n in (40, 400):
        r.flushall()
        videos = [f"/data/line/shift-{i:06d}.mp4" for i in range(n)]
        ids = {v: [f"{i:024x}"] for i, v in enumerate(videos)}
        sink = FiftyOneSinkSpec(dataset="line", field="events", job="prelabel", ids=ids)
        job = client.submit_prelabel(videos, ["jam", "hand"], sink=sink, chunk_size=4)
        messages = r.lrange("prelabel", 0, -1)
        assert len(messages) == n // 4
        sizes[n] = max(len(m) for m in messages)
        shared = r.get(f"stllm:job:{job}:shared")
        assert shared is not None and b"shift-000001" not in shared  # the mapping is not in the shared part
    assert sizes[400] - sizes[40] <= 16, sizes  # only the digits of longer ids differ
    r.flushall()


def test_a_sink_write_that_fails_for_one_video_does_not_end_the_chunk(tiny_spec, tmp_path, monkeypatch):
    """In the task body itself (embedded: no broker): the refused record keeps its result, with the reason,
    and the chunk's other videos are written."""
    from workers.pool import tasks
    from workers.schemas import PrelabelResult
    from workers.sinks.files import JsonlSink as Sink

    real = Sink.write

    def refuse_one(self, records):
        if any(r["video"] == "b.mp4" for r in records):
            raise OSError("disk full")
        real(self, records)

    monkeypatch.setattr(Sink, "write", refuse_one)
    monkeypatch.delenv("STLLM_BROKER_URL", raising=False)

    def fake_job(videos, progress):
        for v in videos:
            progress(PrelabelResult(video=v, model_version="v"))

    out = tasks._run(
        None,
        "job",
        ["a.mp4", "b.mp4", "c.mp4"],
        {"kind": "jsonl", "path": str(tmp_path / "out.jsonl")},
        fake_job,
        lambda video, reason: PrelabelResult(video=video, model_version="v", error=reason),
    )
    assert [r["video"] for r in Sink(tmp_path / "out.jsonl").read()] == ["a.mp4", "c.mp4"]
    assert [r["error"] is None for r in out["results"]] == [True, False, True]
    assert "disk full" in out["results"][1]["error"]
