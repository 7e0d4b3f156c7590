"""The Label Studio backend facing a network: who may say where Label Studio is, where keys go, what the HTTP
surface accepts, and rounds that no bad annotation blocks and that count corrections right."""

from __future__ import annotations

import base64
import json
import multiprocessing
import time

import pytest
from helpers import StubServer

from labelstudio_backend.app import create_app
from labelstudio_backend.backend import Backend, corrections_log
from labelstudio_backend.ledger import RoundLedger
from workers.labelstudio.config import ConfigError, parse_label_config
from workers.labelstudio.media import MediaError, media_source
from workers.labelstudio.rest import LabelStudioAPI, pulled_from_tasks
from workers.labelstudio.settings import BackendSettings

CONFIG = """<View><Video name="video" value="$video" frameRate="10"/>
<TimelineLabels name="events" toName="video"><Label value="jam"/><Label value="hand"/></TimelineLabels></View>"""
BASIC = {"Authorization": "Basic " + base64.b64encode(b"ls:secret").decode()}


@pytest.fixture()
def state(tmp_path, monkeypatch):
    monkeypatch.delenv("STLLM_BROKER_URL", raising=False)
    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "state"


def _setup(client, hostname, token="tok", **kw):
    return client.post("/setup", json={"schema": CONFIG, "hostname": hostname, "access_token": token}, **kw)


# ---------------------------------------------------------------------------------------- 1. /setup


def test_setup_cannot_redirect_an_open_backend(state):
    """Without basic auth, /setup from anywhere but a local Label Studio calling locally learns nothing."""
    s = BackendSettings(state=state)
    client = create_app(s).test_client()
    assert _setup(client, "http://evil.example:8080").status_code == 200  # the config is fine: no 4xx
    assert _setup(client, "http://10.0.0.9:8080").status_code == 200
    assert s.connection() == (None, None)
    remote = client.post(
        "/setup",
        json={"schema": CONFIG, "hostname": "http://localhost:8080", "access_token": "tok"},
        environ_base={"REMOTE_ADDR": "203.0.113.7"},  # localhost URL, but the caller is elsewhere
    )
    assert remote.status_code == 200 and s.connection() == (None, None)
    _setup(client, "http://127.0.0.1:8080")
    assert s.connection() == ("http://127.0.0.1:8080", "tok")
    assert "setup_connection_refused 3" in client.get("/metrics").text


def test_setup_behind_basic_auth_learns_and_a_configured_key_never_goes_to_a_learned_url(state):
    s = BackendSettings(state=state, auth_user="ls", auth_password="secret")
    client = create_app(s).test_client()
    assert _setup(client, "http://ls.internal:8080").status_code == 401
    assert _setup(client, "http://ls.internal:8080", headers=BASIC).status_code == 200
    assert s.connection() == ("http://ls.internal:8080", "tok")
    # only a key configured: the URL must be configured too; nothing learned is paired with the key
    keyed = BackendSettings(state=state, auth_user="ls", auth_password="secret", ls_api_key="real-key")
    client = create_app(keyed).test_client()
    _setup(client, "http://evil.example", headers=BASIC)
    assert keyed.connection() == (None, "real-key")
    # only a URL configured: a key is learned from that origin only (host case and default port normalised)
    urled = BackendSettings(state=state / "u", auth_user="ls", auth_password="secret", ls_url="http://LS:80")
    client = create_app(urled).test_client()
    _setup(client, "http://other:80", token="t1", headers=BASIC)
    assert urled.connection() == ("http://LS:80", None)
    _setup(client, "http://ls", token="t2", headers=BASIC)
    assert urled.connection() == ("http://LS:80", "t2")


@pytest.mark.parametrize(
    "hostname",
    ["file:///etc/passwd", "ftp://ls", "http://user:pw@ls", "http://ls/?x=1", "http://", 42, ["http://ls"]],
)
def test_setup_refuses_urls_that_are_not_a_label_studio_address(state, hostname):
    client = create_app(BackendSettings(state=state, auth_user="ls", auth_password="secret")).test_client()
    r = _setup(client, hostname, headers=BASIC)
    assert r.status_code == 400 and r.json["error"]


def test_the_environment_key_goes_only_to_the_environment_label_studio(monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://ls.internal:8080")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "worker-key")
    assert LabelStudioAPI.from_env().api_key == "worker-key"
    assert LabelStudioAPI.from_env("http://LS.internal:8080/").api_key == "worker-key"
    with pytest.raises(Exception, match="not configured"):
        LabelStudioAPI.from_env("http://evil.example:8080")  # a job naming another URL gets no key


# ---------------------------------------------------------------------------------------- 2, 3. media


@pytest.fixture()
def media_env(tmp_path, monkeypatch):
    import workers.media as media

    monkeypatch.setenv("STLLM_MEDIA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    monkeypatch.setattr(media, "_keys", {})
    return media


def test_the_cloud_resolver_redirect_drops_the_key_and_private_targets_are_refused(
    media_env, monkeypatch, tmp_path
):
    """Label Studio's /tasks/<id>/resolve/ answers 303 to a presigned URL: the download follows it without
    the key. A redirect to a private address is refused unless allowed; a redirect loop stops."""
    from workers.stllm.video import VideoError
    from workers.tools.linevideo import generate_dataset

    video = generate_dataset(tmp_path / "v", 1, seed=3, duration=2.0)[0]["video"]
    body = open(video, "rb").read()

    def bucket_respond(h):
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    bucket = StubServer(bucket_respond)

    def ls_respond(h):
        h.send_response(303)
        h.send_header("Location", f"{bucket.url}/bucket/v.mp4?X-Amz-Signature=abc")
        h.end_headers()

    ls = StubServer(ls_respond)
    try:
        media_env.register_key(ls.url, "secret-key")
        source = media_source("s3://bucket/v.mp4", 7, None, ls.url)
        assert source.startswith(f"{ls.url}/tasks/7/resolve/?fileuri=")
        with pytest.raises(VideoError, match="refused.*private"):
            media_env.fetch(source)  # the bucket is on loopback: not allowed by default
        assert bucket.seen == []
        monkeypatch.setenv("STLLM_LS_ALLOW_PRIVATE", f"127.0.0.1:{bucket.httpd.server_address[1]}")
        path = media_env.fetch(source)
        assert open(path, "rb").read() == body
        assert ls.seen[-1]["auth"] == "Token secret-key"  # Label Studio gets its key
        assert bucket.seen[-1]["auth"] is None  # the presigned URL does not
    finally:
        ls.close()
        bucket.close()

    def loop_respond(h):
        h.send_response(302)
        h.send_header("Location", h.path + "x")
        h.end_headers()

    loop = StubServer(loop_respond)
    try:
        media_env.register_key(loop.url, "k")
        with pytest.raises(VideoError, match="download failed"):
            media_env.fetch(f"{loop.url}/data/upload/1/v.mp4")
        assert len(loop.seen) <= 6  # the first request and at most 5 hops
    finally:
        loop.close()
    with pytest.raises(VideoError, match="refused"):
        media_env.fetch("http://169.254.169.254/latest/meta-data/v.mp4")  # cloud metadata, no connection made


def test_a_short_body_is_an_error_and_nothing_is_cached(media_env, monkeypatch, tmp_path):
    from workers.stllm.video import VideoError

    def short(h):
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        h.wfile.write(b"x" * 10)

    server = StubServer(short)
    try:
        monkeypatch.setenv("STLLM_LS_ALLOW_PRIVATE", "127.0.0.1")
        with pytest.raises(VideoError, match="download"):
            media_env.fetch(f"{server.url}/v.mp4")
        assert not any((tmp_path / "cache").glob("*.mp4"))
    finally:
        server.close()


def test_upload_paths_are_normalised_and_hosts_compare_with_their_port(tmp_path):
    ls = "http://ls.internal:8080"
    assert media_source("/data/upload/3/clip.mp4", 1, None, ls) == f"{ls}/data/upload/3/clip.mp4"
    assert media_source(f"{ls}/data/upload/3/a%20b.mp4", 1, None, ls) == f"{ls}/data/upload/3/a%20b.mp4"
    for bad in (
        "/data/upload/3/../../api/projects",
        "/data/upload/3/..%2F..%2Fapi%2Fusers",
        "/data/upload/3/%2e%2e",
        "/data/upload/3/sub/clip.mp4",
        "/data/upload/x/clip.mp4",
        "/data/upload/3/a%5c..%5capi",
        "/data/upload/3/%252e%252e%252fapi",
    ):
        with pytest.raises(MediaError):
            media_source(bad, 1, None, ls)
    assert media_source("http://Media.Example:8080/v.mp4", 1, None, ls, frozenset({"media.example:8080"}))
    assert media_source("http://media.example/v.mp4", 1, None, ls, frozenset({"media.example"}))
    with pytest.raises(MediaError):
        media_source("http://media.example:9090/v.mp4", 1, None, ls, frozenset({"media.example:8080"}))


# ---------------------------------------------------------------------------------------- 5. HTTP surface


def test_the_http_surface_is_tight(state):
    s = BackendSettings(state=state, max_body=4096)
    client = create_app(s).test_client()
    big = client.post("/predict", data=b"{" + b" " * 10_000 + b"}", content_type="application/json")
    assert big.status_code == 413 and big.json["error"]
    for path in ("/nope", "/static/app.js", "/x%0Aforged_metric%201", "/metrics%0Ainjected"):
        assert client.get(path).status_code == 404
    text = client.get("/metrics").text
    assert "forged" not in text and "injected" not in text and "static" not in text
    lines = text.strip().splitlines()
    for path in [f"/random/{i}" for i in range(50)]:
        client.get(path)
    assert len(client.get("/metrics").text.strip().splitlines()) <= len(lines) + 1  # no counter per path
    assert all(len(line.split()) == 2 for line in client.get("/metrics").text.strip().splitlines())
    with pytest.raises(ValueError, match="both"):
        BackendSettings(state=state, auth_user="ls")
    with pytest.raises(ValueError, match="both"):
        BackendSettings(state=state, auth_password="secret")
    guarded = create_app(BackendSettings(state=state, auth_user="ls", auth_password="secret")).test_client()
    assert guarded.get("/metrics").status_code == 401
    wrong = {"Authorization": "Basic " + base64.b64encode(b"ls:secreT").decode()}
    assert guarded.get("/metrics", headers=wrong).status_code == 401
    metrics = guarded.get("/metrics", headers=BASIC).text
    assert "requests_unauthorized 2" in metrics and "requests__metrics 1" in metrics


# ---------------------------------------------------------------------------------------- 7. configs, types


@pytest.mark.parametrize(
    "config, reason",
    [
        (CONFIG.replace('frameRate="10"', 'frameRate="NaN"'), "frameRate"),
        (CONFIG.replace('frameRate="10"', 'frameRate="inf"'), "frameRate"),
        (CONFIG.replace('frameRate="10"', 'frameRate="-3"'), "frameRate"),
        (CONFIG.replace('frameRate="10"', 'frameRate="1e9"'), "frameRate"),
        (CONFIG.replace('<Label value="hand"/>', '<Label value="jam"/>'), "repeats"),
        ('<!DOCTYPE x [<!ENTITY e "jam">]>' + CONFIG, "DOCTYPE"),
        (CONFIG.replace("<View>", '<!ENTITY e SYSTEM "file:///etc/passwd"><View>'), "DOCTYPE"),
    ],
)
def test_configs_are_checked_where_they_enter(state, config, reason):
    with pytest.raises(ConfigError, match=reason):
        parse_label_config(config)
    client = create_app(BackendSettings(state=state)).test_client()
    r = client.post("/setup", json={"schema": config})
    assert r.status_code == 400 and reason in r.json["error"]


ANNOTATION = {
    "id": 41,
    "task": 1,
    "updated_at": "2026-11-27T10:00:00Z",
    "result": [
        {
            "type": "timelinelabels",
            "from_name": "events",
            "to_name": "video",
            "value": {"ranges": [{"start": 3, "end": 9}], "timelinelabels": ["jam"]},
        }
    ],
}


@pytest.mark.parametrize(
    "route, body",
    [
        ("/predict", {"tasks": [{"id": [1]}], "label_config": CONFIG}),
        ("/predict", {"tasks": [{"id": {"a": 1}}], "label_config": CONFIG}),
        ("/predict", {"tasks": [{"id": True}], "label_config": CONFIG}),
        ("/predict", {"tasks": [{"id": 1, "data": "video.mp4"}], "label_config": CONFIG}),
        ("/predict", {"tasks": [{"id": 1, "data": {"video": 12}}], "label_config": CONFIG}),
        ("/predict", {"tasks": [{"id": 1}], "label_config": {"xml": CONFIG}}),
        (
            "/webhook",
            {"action": "ANNOTATION_CREATED", "project": {"id": 1}, "annotation": {**ANNOTATION, "id": [41]}},
        ),
        ("/webhook", {"action": "ANNOTATION_CREATED", "project": {"id": "1"}, "annotation": ANNOTATION}),
        ("/webhook", {"action": "ANNOTATION_CREATED", "project": [1], "annotation": ANNOTATION}),
        (
            "/webhook",
            {
                "action": "ANNOTATION_CREATED",
                "project": {"id": 1},
                "annotation": {**ANNOTATION, "result": "x"},
            },
        ),
        (
            "/webhook",
            {
                "action": "ANNOTATION_CREATED",
                "project": {"id": 1},
                "task": {"id": [1]},
                "annotation": ANNOTATION,
            },
        ),
        ("/webhook", {"action": ["ANNOTATION_CREATED"]}),
        ("/webhook", {"action": "START_TRAINING", "project": {"id": {"$gt": 0}}}),
        ("/train", {"annotations": [{"id": "1"}], "label_config": CONFIG}),
        ("/train", {"annotations": {"id": 1}, "label_config": CONFIG}),
        ("/train", {"annotations": [{"id": 1, "annotations": []}], "label_config": CONFIG, "project": [1]}),
    ],
)
def test_every_client_type_gets_a_400_and_the_next_request_is_unaffected(state, route, body):
    client = create_app(BackendSettings(state=state)).test_client()
    r = client.post(route, json=body)
    assert r.status_code == 400 and r.json["error"], r.json
    good = {"action": "ANNOTATION_CREATED", "project": {"id": 1}, "task": {"id": 1}, "annotation": ANNOTATION}
    assert client.post("/webhook", json=good).status_code == 201
    assert client.post("/webhook", json={**good, "annotation": {**ANNOTATION, "id": 42}}).status_code == 201


# ---------------------------------------------------------------------------------------- 9. bad annotations


def _task(i, result, video="line/v.mp4"):
    return {
        "id": i,
        "data": {"video": f"/data/local-files/?d={video}"},
        "annotations": [{"id": 100 + i, "result": result, "updated_at": "2026-11-27T10:00:00Z"}],
    }


def _region(value):
    return [{"type": "timelinelabels", "from_name": "events", "to_name": "video", "value": value}]


BAD_ANNOTATIONS = {
    "reversed": _region({"ranges": [{"start": 9, "end": 3}], "timelinelabels": ["jam"]}),
    "frame 0": _region({"ranges": [{"start": 0, "end": 3}], "timelinelabels": ["jam"]}),
    "no start": _region({"ranges": [{"end": 3}], "timelinelabels": ["jam"]}),
    "value a list": _region([{"ranges": [{"start": 1, "end": 3}]}]),
    "unknown label": _region({"ranges": [{"start": 1, "end": 3}], "timelinelabels": ["smoke"]}),
    "result a dict": {"type": "timelinelabels"},
}


def test_bad_annotations_are_skipped_with_their_reason_and_the_rest_trains(tmp_path):
    config = parse_label_config(CONFIG)
    (tmp_path / "line").mkdir()
    (tmp_path / "line" / "v.mp4").write_bytes(b"")
    good = _region({"ranges": [{"start": 1, "end": 3}], "timelinelabels": ["jam"]})
    tasks = [_task(i, result) for i, result in enumerate(BAD_ANNOTATIONS.values(), start=1)]
    tasks += [
        _task(50, good),
        _task(51, good, video="../outside.mp4"),
        {"id": 52, "data": "x", "annotations": []},
    ]
    pulled = pulled_from_tasks(tasks, config, str(tmp_path))
    assert [t["task"] for t in pulled["tasks"]] == [50]
    reasons = {x["task"]: x["reason"] for x in pulled["skipped"]}
    assert set(reasons) == set(range(1, len(BAD_ANNOTATIONS) + 1)) | {51, 52}
    assert "before it starts" in reasons[1] and "from 1" in reasons[2] and "smoke" in reasons[5]


def test_train_with_only_bad_annotations_is_a_400_and_with_some_good_a_round(state, tmp_path, monkeypatch):
    import labelstudio_backend.backend as backend_module

    submitted = []
    monkeypatch.setattr(
        backend_module, "start_round", lambda pulled, s: submitted.append(pulled) or "round-1"
    )
    (tmp_path / "line").mkdir()
    (tmp_path / "line" / "v.mp4").write_bytes(b"")
    s = BackendSettings(state=state, document_root=str(tmp_path))
    client = create_app(s).test_client()
    bad = [_task(i, r) for i, r in enumerate(BAD_ANNOTATIONS.values(), start=1)]
    r = client.post("/train", json={"annotations": bad, "label_config": CONFIG, "project": 5})
    assert r.status_code == 400 and "no usable annotation" in r.json["error"]
    good = _region({"ranges": [{"start": 1, "end": 3}], "timelinelabels": ["jam"]})
    r = client.post(
        "/train", json={"annotations": [*bad, _task(9, good)], "label_config": CONFIG, "project": 5}
    )
    assert r.status_code == 201 and len(r.json["skipped"]) == len(BAD_ANNOTATIONS)
    _wait(lambda: submitted)
    assert [t["task"] for t in submitted[0]["tasks"]] == [9]


def _wait(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


# ---------------------------------------------------------------------------------------- 10. counting


def _event(action, annotation, stamp="2026-11-27T10:00:00Z", project=4):
    if action == "ANNOTATIONS_DELETED":
        return {"action": action, "project": {"id": project}, "annotations": [{"id": annotation}]}
    return {
        "action": action,
        "project": {"id": project},
        "task": {"id": 1},
        "annotation": {**ANNOTATION, "id": annotation, "updated_at": stamp},
    }


def test_automatic_rounds_count_distinct_corrections(state):
    s = BackendSettings(state=state, round_every=4)
    client = create_app(s).test_client()
    ledger = RoundLedger(state / "rounds.sqlite")
    for a in (1, 2, 2, 1):  # redeliveries count once
        client.post("/webhook", json=_event("ANNOTATION_CREATED", a))
    assert ledger.pending(4) == 2
    client.post("/webhook", json=_event("ANNOTATION_CREATED", 3))
    assert ledger.pending(4) == 3
    client.post("/webhook", json=_event("ANNOTATIONS_DELETED", 3))  # a deletion subtracts
    assert ledger.pending(4) == 2
    client.post(
        "/webhook", json=_event("ANNOTATION_UPDATED", 2, stamp="2026-11-27T11:00:00Z")
    )  # same annotation
    assert ledger.pending(4) == 2 and ledger.requests(4) == []
    client.post("/webhook", json=_event("ANNOTATION_CREATED", 4))
    client.post("/webhook", json=_event("ANNOTATION_CREATED", 5))
    assert len(ledger.requests(4)) == 1 and ledger.pending(4) == 0  # the fourth distinct correction: a round
    for a in (1, 2, 4, 5):  # delivered again after the round: not new
        client.post(
            "/webhook",
            json=_event("ANNOTATION_UPDATED", a, stamp="2026-11-27T11:00:00Z"),
        )
    assert ledger.pending(4) == 3  # 1, 4 and 5 have a new update time: new corrections; 2's is a redelivery
    events = [r for r in corrections_log(s) if r["action"] == "ROUND_REQUESTED"]
    assert len(events) == 1


def _press(path: str, project: int, n: int, out) -> None:
    ledger = RoundLedger(path)
    out.put(sum(ledger.request(project, "START_TRAINING") is not None for _ in range(n)))


def test_twenty_presses_from_several_processes_start_one_round(state):
    """The ledger is shared by all backend processes: concurrent requests make one round."""
    RoundLedger(state / "rounds.sqlite")
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_press, args=(str(state / "rounds.sqlite"), 9, 5, out)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert sum(out.get(timeout=5) for _ in procs) == 1


def test_a_requested_round_survives_a_restart_and_an_unchanged_snapshot_is_not_rerun(state, monkeypatch):
    import labelstudio_backend.backend as backend_module

    pulled = {
        "project": 7,
        "labels": [{"name": "jam"}],
        "tasks": [{"task": 1, "segments": []}],
        "skipped": [],
    }
    pulls, rounds = [], []
    monkeypatch.setattr(backend_module, "pull_corrections", lambda *a, **k: pulls.append(1) or pulled)
    monkeypatch.setattr(backend_module.LabelStudioAPI, "from_env", classmethod(lambda cls, url, key: None))
    monkeypatch.setattr(
        backend_module, "start_round", lambda p, s: rounds.append(p) or f"round-{len(rounds)}"
    )
    ledger = RoundLedger(state / "rounds.sqlite")
    request_id = ledger.request(7, "START_TRAINING")  # requested, then the process died before submitting
    Backend(BackendSettings(state=state))  # a restart submits it
    _wait(lambda: rounds)
    assert ledger.requests(7)[0]["status"] == "submitted" and ledger.requests(7)[0]["id"] == request_id
    client = create_app(BackendSettings(state=state)).test_client()
    ledger.finish(request_id, "submitted", round_id="round-1", digest=ledger.requests(7)[0]["digest"])
    time.sleep(0.01)
    # pressed again with the same corrections: no second round (after the coalescing window)
    monkeypatch.setattr(RoundLedger, "request", _no_coalesce(RoundLedger.request))
    assert client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}}).status_code == 201
    _wait(lambda: any(r["status"] == "skipped" for r in ledger.requests(7)))
    assert (
        len(rounds) == 1
        and [r["action"] for r in corrections_log(BackendSettings(state=state))][-1] == "ROUND_SKIPPED"
    )


def _no_coalesce(request):
    def without_window(self, project, reason, threshold=None, coalesce_s=60.0):
        return request(self, project, reason, threshold, coalesce_s=0.0)

    return without_window


def test_redelivered_payload_is_json_and_types_are_kept(state):
    """The ledger stores what the log records: the same annotation id as an int and its stamp."""
    client = create_app(BackendSettings(state=state)).test_client()
    client.post("/webhook", json=_event("ANNOTATION_CREATED", 5))
    record = [r for r in corrections_log(BackendSettings(state=state)) if r.get("annotation") == 5][0]
    assert json.loads(json.dumps(record))["annotation"] == 5


# ---------------------------------------------------------------------------------------- 6. keys and Redis


def _redis_text(port: int) -> str:
    """Everything stored in the Redis server (every database), queue messages decoded (kombu keeps their
    bodies base64-encoded, which a plain search would miss)."""
    from redis import Redis as Client

    texts = []
    for db in range(4):
        r = Client(port=port, db=db)
        for key in r.scan_iter():
            kind = r.type(key).decode()
            if kind == "string":
                values = [r.get(key)]
            elif kind == "list":
                values = r.lrange(key, 0, -1)
            elif kind == "hash":
                values = list(r.hgetall(key).values())
            elif kind == "set":
                values = list(r.smembers(key))
            else:
                values = r.zrange(key, 0, -1) if kind == "zset" else []
            for v in values:
                text = v.decode(errors="replace")
                texts.append(text)
                try:
                    message = json.loads(text)
                    if isinstance(message, list):  # the unacked hash keeps [message, exchange, routing key]
                        message = message[0]
                    texts.append(base64.b64decode(message["body"]).decode(errors="replace"))
                except (ValueError, KeyError, TypeError, IndexError):
                    pass
    return "\n".join(texts)


def test_the_api_key_stays_out_of_redis_by_default(redis_server, tmp_path):
    """Queued pre-label tasks and rounds carry no key unless STLLM_LS_SEND_KEY=1; even then the task events
    (argsrepr, what Flower shows) and the results never do. No worker runs: the messages stay queued."""
    from redis import Redis as Client

    from workers.labelstudio.jobs import enqueue_prelabel, start_round

    (tmp_path / "line").mkdir()
    (tmp_path / "line" / "v.mp4").write_bytes(b"")
    secret = "sekret-KEY-4711"
    s = BackendSettings(
        state=tmp_path / "s", document_root=str(tmp_path), ls_url="http://ls.internal:8080", ls_api_key=secret
    )
    assert s.send_key is False
    for db in range(4):
        Client(port=redis_server.port, db=db).flushdb()
    job, skipped = enqueue_prelabel(
        [{"id": 1, "data": {"video": "/data/local-files/?d=line/v.mp4"}}], CONFIG, s
    )
    assert job and not skipped
    pulled = {"project": 1, "url": s.ls_url, "labels": [{"name": "jam"}], "tasks": [], "skipped": []}
    start_round(pulled, s)
    text = _redis_text(redis_server.port)
    assert "line/v.mp4" in text and "ls.internal" in text  # the jobs are there
    assert secret not in text
    s.send_key = True  # opted in: the messages carry it, the events do not
    enqueue_prelabel([{"id": 2, "data": {"video": "/data/local-files/?d=line/v.mp4"}}], CONFIG, s)
    text = _redis_text(redis_server.port)
    assert secret in text
    headers = [
        json.loads(v)["headers"]
        for v in Client(port=redis_server.port).lrange("prelabel", 0, -1)
        if "headers" in json.loads(v)
    ]
    assert headers and all(secret not in h.get("argsrepr", "") + h.get("kwargsrepr", "") for h in headers)
    assert (
        secret not in Client(port=redis_server.port).lrange("prelabel", -1, -1)[0].decode()
    )  # in the job's part
    from workers.pool.client import redacted_repr

    assert secret not in redacted_repr(({"api_key": secret, "url": "http://ls"},))
