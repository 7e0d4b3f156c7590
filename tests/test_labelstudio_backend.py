"""The ML-backend protocol with Flask's test client and payloads shaped like Label Studio's."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from labelstudio_backend.app import create_app
from labelstudio_backend.backend import corrections_log
from workers.labelstudio.media import MediaError, resolve_local
from workers.labelstudio.settings import BackendSettings
from workers.sinks.files import SqliteStore
from workers.tools.linevideo import generate_dataset

CONFIG = """<View><Video name="video" value="$video" frameRate="10"/>
<TimelineLabels name="events" toName="video"><Label value="jam"/><Label value="hand"/></TimelineLabels></View>"""


@pytest.fixture()
def backend(tmp_path, monkeypatch, model_dir):
    monkeypatch.delenv("STLLM_BROKER_URL", raising=False)
    monkeypatch.setenv("STLLM_MODEL", model_dir)
    monkeypatch.setenv("STLLM_DTYPE", "fp32")
    root = tmp_path / "media"
    records = generate_dataset(root / "line", 2, seed=800, duration=6.0)
    settings = BackendSettings(state=tmp_path / "state", document_root=str(root))
    app = create_app(settings)
    return app.test_client(), settings, [r["video"] for r in records]


def task(i: int, rel: str) -> dict:
    return {"id": i, "data": {"video": f"/data/local-files/?d={rel}"}}


def test_health_and_setup_are_cheap_and_name_the_served_version(backend):
    client, _, _ = backend
    assert client.get("/health").json == {
        "status": "UP",
        "model_class": "ST-LLM",
        "model_version": "tiny@base",
    }
    r = client.post(
        "/setup",
        json={"project": "3.1700000000", "schema": CONFIG, "hostname": "http://ls", "access_token": "x"},
    )
    assert r.status_code == 200 and r.json == {"model_version": "tiny@base"}


def test_setup_refuses_a_config_it_cannot_serve(backend):
    client, _, _ = backend
    r = client.post("/setup", json={"schema": '<View><Image name="i" value="$image"/></View>'})
    assert r.status_code == 400 and "no <Video>" in r.json["error"]


def test_predict_enqueues_then_serves_the_workers_predictions(backend):
    client, settings, _ = backend
    tasks = [task(1, "line/line_00800.mp4"), task(2, "line/line_00801.mp4"), task(3, "../../etc/passwd")]
    first = client.post(
        "/predict",
        json={"tasks": tasks, "label_config": CONFIG, "project": "1.1", "params": {"context": None}},
    )
    assert first.status_code == 200 and len(first.json["results"]) == 3  # one per task, aligned
    # nothing made yet, and never computed in the request: an empty list per task, which Label Studio stores
    # as no prediction at all (an empty prediction would mark the task as done for this version)
    assert first.json["results"] == [[], [], []]
    cache = SqliteStore(settings.state / "predictions.sqlite")
    deadline = time.monotonic() + 60
    while len(cache.read()) < 2 and time.monotonic() < deadline:  # made beside the request
        time.sleep(0.3)
    made = {r["task"]: r["prediction"] for r in cache.read()}
    assert set(made) == {1, 2} and all(p["model_version"] == "tiny@base" for p in made.values())
    results = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG}).json["results"]
    assert results[:2] == [made[1], made[2]]  # served from what the worker made, for the served version
    assert results[2] == []  # the path escape was refused, not served
    again = client.post("/predict", json={"tasks": tasks[2:], "label_config": CONFIG})
    assert again.json["results"] == [[]]
    metrics = client.get("/metrics").text
    assert "media_errors 1" in metrics and "tasks_enqueued 2" in metrics  # nothing queued twice


def test_tasks_on_one_video_file_each_get_their_prediction(backend):
    client, settings, _ = backend
    tasks = [task(7, "line/line_00800.mp4"), task(8, "line/line_00800.mp4"), task(9, "line/line_00801.mp4")]
    assert client.post("/predict", json={"tasks": tasks, "label_config": CONFIG}).status_code == 200
    cache = SqliteStore(settings.state / "predictions.sqlite")
    deadline = time.monotonic() + 60
    while len(cache.read()) < 3 and time.monotonic() < deadline:
        time.sleep(0.3)
    made = {r["task"]: r["prediction"] for r in cache.read()}
    assert set(made) == {7, 8, 9} and made[7] == made[8]
    assert "tasks_enqueued 3" in client.get("/metrics").text


ANNOTATION = {
    "id": 41,
    "task": 1,
    "result": [
        {
            "type": "timelinelabels",
            "from_name": "events",
            "to_name": "video",
            "value": {"ranges": [{"start": 3, "end": 9}], "timelinelabels": ["jam"]},
        }
    ],
    "parent_prediction": 7,
    "origin": "prediction-changed",
    "updated_at": "2026-11-27T10:00:00Z",
}


def test_webhook_records_corrections_once_per_update(backend):
    client, settings, _ = backend
    body = {"action": "ANNOTATION_CREATED", "project": {"id": 1}, "task": {"id": 1}, "annotation": ANNOTATION}
    assert client.post("/webhook", json=body).status_code == 201
    assert client.post("/webhook", json=body).status_code == 201  # a repeat
    updated = {
        **body,
        "action": "ANNOTATION_UPDATED",
        "annotation": {**ANNOTATION, "updated_at": "2026-11-27T11:00:00Z"},
    }
    assert client.post("/webhook", json=updated).status_code == 201
    bulk = {
        "action": "ANNOTATIONS_CREATED",
        "project": {"id": 1},
        "annotations": [{**ANNOTATION, "id": 42}, {**ANNOTATION, "id": 43}],
    }
    assert client.post("/webhook", json=bulk).json["count"] == 2
    deleted = {"action": "ANNOTATIONS_DELETED", "project": {"id": 1}, "annotations": [{"id": 43}]}
    assert client.post("/webhook", json=deleted).status_code == 201
    log = [r for r in corrections_log(settings) if "annotation" in r]
    assert sorted((r["annotation"], r["updated"]) for r in log) == [
        (41, "2026-11-27T10:00:00Z"),
        (41, "2026-11-27T11:00:00Z"),
        (42, "2026-11-27T10:00:00Z"),
        (43, ""),
        (43, "2026-11-27T10:00:00Z"),
    ]
    assert {r["parent_prediction"] for r in log if r["annotation"] == 41} == {7}
    r = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
    assert r.status_code == 201 and r.json["project"] == 1
    # the pull happens after the answer; with no Label Studio API configured it fails, and says so
    failed = _wait_for(settings, "ROUND_FAILED")
    assert "LABEL_STUDIO_URL" in failed["error"] and failed["reason"] == "START_TRAINING"


def _wait_for(settings: BackendSettings, action: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = [r for r in corrections_log(settings) if r["action"] == action]
        if hits:
            return hits[-1]
        time.sleep(0.2)
    raise AssertionError(f"no {action} event within {timeout} s: {corrections_log(settings)}")


def test_a_round_is_requested_after_every_n_new_corrections(backend):
    client, settings, _ = backend
    settings.round_every = 2
    body = {"action": "ANNOTATION_CREATED", "project": {"id": 4}, "task": {"id": 1}}
    client.post("/webhook", json={**body, "annotation": {**ANNOTATION, "id": 61}})
    assert not [r for r in corrections_log(settings) if r["action"] == "ROUND_REQUESTED"]
    client.post("/webhook", json={**body, "annotation": {**ANNOTATION, "id": 61}})  # a repeat is not new
    assert not [r for r in corrections_log(settings) if r["action"] == "ROUND_REQUESTED"]
    client.post("/webhook", json={**body, "annotation": {**ANNOTATION, "id": 62}})
    requested = [r for r in corrections_log(settings) if r["action"] == "ROUND_REQUESTED"]
    assert len(requested) == 1 and requested[0]["reason"] == "2 new corrections"
    assert _wait_for(settings, "ROUND_FAILED")["project"] == 4  # no Label Studio here to pull from


def test_setup_learns_where_a_label_studio_on_this_machine_is(backend):
    client, settings, _ = backend
    assert settings.connection() == (None, None)
    client.post("/setup", json={"schema": CONFIG, "hostname": "http://localhost:8080", "access_token": "tok"})
    assert settings.connection() == ("http://localhost:8080", "tok")
    assert (settings.state / "connection.json").stat().st_mode & 0o077 == 0  # the key is not world-readable


def test_train_call_runs_a_round_on_the_annotated_tasks(backend, tmp_path, monkeypatch, tiny_spec):
    """Label Studio's older /train call carries the annotated tasks inline; in the embedded default the round
    runs beside the requests, and its result names the new version."""
    from workers.pool import client as pool
    from workers.rounds.registry import ModelStore
    from workers.rounds.run import init_store

    client, settings, _ = backend
    videos = [r["video"] for r in generate_dataset(tmp_path / "media" / "line", 6, seed=810, duration=4.0)]
    store = ModelStore(tmp_path / "store")
    init_store(store, tiny_spec)
    monkeypatch.setenv("STLLM_MODEL_STORE", str(store.root))
    settings.round_settings = {"train": {"steps": 2, "batch_size": 2}, "force": True}
    region = dict(ANNOTATION["result"][0])
    tasks = [
        {
            **task(i + 1, f"line/{v.rsplit('/', 1)[1]}"),
            "annotations": [{**ANNOTATION, "id": 50 + i, "result": [region]}],
        }
        for i, v in enumerate(videos)
    ] + [{**task(9, "line/none.mp4"), "annotations": []}]
    r = client.post("/train", json={"annotations": tasks, "project": "1.17", "label_config": CONFIG})
    assert r.status_code == 201 and r.json["tasks"] == 6  # the unannotated task is not a correction
    submitted = _wait_for(settings, "ROUND_SUBMITTED", timeout=300)
    state, result = pool.round_status(submitted["round"])
    assert state == "SUCCESS", result
    assert result["version"] == "round-1" and result["promoted"]
    snap = store.read()["versions"]["round-1"]["snapshot"]
    frozen = (store.root / "snapshots" / f"{snap}.json").read_text()
    assert '"annotation": 50' in frozen and '"source": "labelstudio"' in frozen


@pytest.mark.parametrize(
    "body",
    [
        None,
        "not json",
        {"action": "NOPE"},
        {"action": "ANNOTATION_CREATED"},
        {"action": "ANNOTATION_CREATED", "annotation": {"no": "id"}},
        {"action": "START_TRAINING"},
        {"action": "ANNOTATIONS_CREATED", "annotations": "x"},
    ],
)
def test_malformed_webhooks_get_a_4xx_with_a_reason(backend, body):
    client, _, _ = backend
    r = client.post(
        "/webhook",
        data=body if isinstance(body, str) else None,
        json=body if not isinstance(body, str) else None,
    )
    assert 400 <= r.status_code < 500 and r.json["error"]


def test_malformed_predict_and_setup_get_a_4xx(backend):
    client, _, _ = backend
    assert client.post("/predict", json={"tasks": "x", "label_config": CONFIG}).status_code == 400
    assert client.post("/predict", json={"tasks": [{"id": 1}], "label_config": ""}).status_code == 400
    assert client.post("/setup", data="<xml>").status_code == 400


def test_basic_auth_when_configured(tmp_path):
    app = create_app(BackendSettings(state=tmp_path, auth_user="ls", auth_password="secret"))
    c = app.test_client()
    assert c.get("/health").status_code == 200
    assert c.post("/setup", json={"schema": CONFIG}).status_code == 401
    ok = c.post("/setup", json={"schema": CONFIG}, headers={"Authorization": "Basic bHM6c2VjcmV0"})
    assert ok.status_code == 200


def test_local_files_resolve_under_the_document_root_only(tmp_path):
    assert resolve_local("/data/local-files/?d=a/b.mp4", tmp_path) == tmp_path.resolve() / "a" / "b.mp4"
    for bad in (
        "/data/local-files/?d=../x.mp4",
        "/data/local-files/?d=%2e%2e/x",
        "http://evil.example/v.mp4",
        "/tmp/x.mp4",
        "",
    ):
        with pytest.raises(MediaError):
            resolve_local(bad, tmp_path)


def test_stllm_labelstudio_serve_answers_health_over_http(tmp_path, model_dir):
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "STLLM_MODEL": model_dir, "STLLM_LS_STATE": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "labelstudio", "serve", "--port", str(port), "--workers", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    from helpers import get_health

    try:
        assert get_health(port, 30)["model_version"] == "tiny@base"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)


@pytest.mark.parametrize("send_key", [True, False])
def test_queued_jobs_carry_the_api_key_only_when_allowed(backend, monkeypatch, send_key):
    from workers.labelstudio.jobs import enqueue_prelabel
    from workers.pool import client as pool

    _, settings, _ = backend
    settings.ls_url, settings.ls_api_key, settings.send_key = "http://ls:8080", "secret-key", send_key
    monkeypatch.setenv("STLLM_BROKER_URL", "redis://127.0.0.1:1/0")  # through a broker (nothing is sent here)
    sent = {}
    monkeypatch.setattr(
        pool, "submit_prelabel", lambda videos, labels, sink: sent.update(sink.model_dump()) or "job"
    )
    job, skipped = enqueue_prelabel([task(1, "line/line_00800.mp4")], CONFIG, settings)
    assert job == "job" and not skipped
    assert sent["url"] == "http://ls:8080" and sent["api_key"] == ("secret-key" if send_key else None)


def test_predict_in_interactive_mode_answers_like_a_batch_call(backend):
    """An annotator opening a task sends one task with ``params.context`` holding their current regions; the
    backend has no interactive model, so it serves what the workers made (nothing yet: an empty list)."""
    client, _, _ = backend
    context = {"result": [{**ANNOTATION["result"][0], "id": "r1"}]}
    r = client.post(
        "/predict",
        json={
            "tasks": [task(1, "line/line_00800.mp4")],
            "label_config": CONFIG,
            "project": "1.1700000000",
            "params": {"login": None, "password": None, "context": context},
        },
    )
    assert r.status_code == 200 and r.json["results"] == [[]] and r.json["model_version"] == "tiny@base"


def _open_ledger_and_store(args: tuple) -> str:
    """One process of many starting at once on the same fresh state (what gunicorn's workers do)."""
    state, barrier = args
    from labelstudio_backend.ledger import RoundLedger
    from workers.sinks.files import SqliteStore

    barrier.wait(30)
    RoundLedger(Path(state) / "rounds.sqlite")
    SqliteStore(Path(state) / "predictions.sqlite").write([{"video": "v", "model_version": "m"}])
    return "ok"


def test_processes_opening_fresh_state_together_all_start(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    n = 6
    with ctx.Manager() as manager:
        barrier = manager.Barrier(n)
        with ctx.Pool(n) as pool:
            assert pool.map(_open_ledger_and_store, [(str(tmp_path), barrier)] * n) == ["ok"] * n
    import sqlite3

    with sqlite3.connect(tmp_path / "rounds.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
