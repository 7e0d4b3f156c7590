"""End to end against a real Label Studio server (label-studio 1.23.2 in its own virtual environment,
``.venv-ls``, which `make test` creates), the backend under gunicorn, Redis, and real Celery workers.

A project with a video TimelineLabels config and local storage gets generated line videos; the backend is
connected with basic auth; Label Studio asks it for predictions and a worker pushes them; an annotation
made through the API reaches the webhook; "Start Training" runs a round that the workers then serve.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import Worker, free_port, get_health

ROOT = Path(__file__).resolve().parents[1]
LABEL_STUDIO = Path(os.environ.get("STLLM_LABEL_STUDIO_BIN", ROOT / ".venv-ls" / "bin" / "label-studio"))
TOKEN = "stllm-test-token-0123456789"
CONFIG = """<View><Video name="video" value="$video" frameRate="10"/>
<TimelineLabels name="events" toName="video">
<Label value="jam" hint="the conveyor stops with parts piled up"/><Label value="hand"/>
</TimelineLabels></View>"""

pytestmark = [
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs Debian's redis-server"),
    pytest.mark.skipif(
        not LABEL_STUDIO.exists() and not os.environ.get("CI"),
        reason=f"no Label Studio server at {LABEL_STUDIO}: `make test` installs it",
    ),
]


def _wait(what: str, check, timeout: float, poll: float = 0.3):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(poll)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    from workers.tools.linevideo import generate_dataset

    root = tmp_path_factory.mktemp("ls-media")
    generate_dataset(root / "line", 5, seed=700, duration=6.0)  # 10 fps, like the project
    generate_dataset(root / "line", 1, seed=705, duration=4.0, fps=25.0)  # another rate: flagged
    return root


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory, media):
    """A Label Studio server on loopback with SQLite, a user with a known token, local files served."""
    port = free_port()
    data = tmp_path_factory.mktemp("ls-data")
    env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(data),
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        "LOCAL_FILES_SERVING_ENABLED": "true",
        "LOCAL_FILES_DOCUMENT_ROOT": str(media),
        "LATEST_VERSION_CHECK": "false",
        "DJANGO_DB": "sqlite",
    }
    log = open(data / "label-studio.log", "w")
    proc = subprocess.Popen(
        [
            str(LABEL_STUDIO),
            "start",
            "--no-browser",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--username",
            "qa@example.com",
            "--password",
            "stllm-secret-1",
            "--user-token",
            TOKEN,
            "--enable-legacy-api-token",
            "--data-dir",
            str(data),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    from workers.labelstudio.rest import LabelStudioAPI

    api = LabelStudioAPI(url, TOKEN)

    def up() -> bool:
        assert proc.poll() is None, (data / "label-studio.log").read_text()[-3000:]
        try:
            api.client.projects.list()
            return True
        except Exception:
            return False

    try:
        _wait("Label Studio to answer", up, timeout=240, poll=1.0)
        yield api
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_spec):
    from workers.rounds.registry import ModelStore
    from workers.rounds.run import init_store

    s = ModelStore(tmp_path_factory.mktemp("ls-store") / "store")
    init_store(s, tiny_spec)
    return s


@pytest.fixture(scope="module")
def pool(redis_server, store, model_dir, label_studio, tmp_path_factory):
    """A prediction worker and a rounds worker following the model store, with their own Label Studio key
    (jobs do not carry it through Redis)."""
    logs = tmp_path_factory.mktemp("ls-workers")
    env = {
        "STLLM_MODEL_STORE": str(store.root),
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": TOKEN,
    }
    started = [  # each with its own media cache, so that each download is its own
        Worker("lsw", model_dir, logs / "lsw.log", {**env, "STLLM_MEDIA_CACHE": str(logs / "cache-w")}),
        Worker(
            "lsr",
            model_dir,
            logs / "lsr.log",
            {**env, "STLLM_MEDIA_CACHE": str(logs / "cache-r")},
            "finetune",
        ),
    ]
    for w in started:
        w.wait_ready(120)
    yield started
    for w in started:
        w.stop()


@pytest.fixture(scope="module")
def backend(label_studio, media, store, pool, tmp_path_factory):
    """`stllm labelstudio serve` (gunicorn) with basic auth, pushing to the server above."""
    port = free_port()
    state = tmp_path_factory.mktemp("ls-backend")
    env = {
        **os.environ,
        "STLLM_LS_STATE": str(state),
        "STLLM_MODEL_STORE": str(store.root),
        "LOCAL_FILES_DOCUMENT_ROOT": str(media),
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": TOKEN,
        "STLLM_LS_BASIC_AUTH_USER": "ls",
        "STLLM_LS_BASIC_AUTH_PASSWORD": "hook-secret",
        "STLLM_LS_ROUND_SETTINGS": json.dumps({"train": {"steps": 3, "batch_size": 2}, "force": True}),
    }
    log = open(state / "backend.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "labelstudio", "serve", "--port", str(port), "--workers", "2"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        get_health(port, 60, why=str(state / "backend.log"))
        yield {"url": f"http://127.0.0.1:{port}", "state": state, "env": env, "store": store}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def _stllm(backend, *args) -> subprocess.CompletedProcess:
    """The `stllm` command with the backend's environment (Label Studio URL and key, broker, store)."""
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *map(str, args)],
        env=backend["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _region(start: int, end: int, label: str) -> dict:
    """An annotator's timeline region on the project's video (frames at its frameRate)."""
    return {
        "from_name": "events",
        "to_name": "video",
        "type": "timelinelabels",
        "value": {"ranges": [{"start": start, "end": end}], "timelinelabels": [label]},
    }


def _events(backend, action: str) -> list[dict]:
    path = backend["state"] / "corrections.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if r.get("action") == action]


def _project_with_media(label_studio, media, title: str) -> tuple[int, list[dict]]:
    """A new project over the six line videos (local storage), its tasks imported."""
    api, ls = label_studio, label_studio.client
    project = ls.projects.create(title=title, label_config=CONFIG).id
    storage = ls.import_storage.local.create(
        project=project, path=str(media / "line"), regex_filter=r".*\.mp4", use_blob_urls=True
    )
    ls.import_storage.local.sync(id=storage.id)
    tasks = _wait("6 imported tasks", lambda: (t := api.tasks(project)) and len(t) == 6 and t, timeout=60)
    return project, tasks


def _next_round(store) -> str:
    return f"round-{sum(name.startswith('round-') for name in store.read()['versions']) + 1}"


def test_label_studio_end_to_end(label_studio, backend, store, media):
    api, ls = label_studio, label_studio.client
    project, tasks = _project_with_media(label_studio, media, "line QA")

    # connect with basic auth: Label Studio calls /health and /setup; its webhook gets the header too
    connected = _stllm(
        backend, "labelstudio", "connect", "--project", project, "--backend-url", backend["url"]
    )
    assert connected.returncode == 0, connected.stderr
    ml = [m for m in ls.ml.list(project=project)][0]
    assert ml.state == "CO" and ml.model_version == "base", (ml.state, ml.error_message)
    hook = [h for h in ls.webhooks.list(project=str(project)) if h.url.endswith("/webhook")][0]
    assert hook.headers["Authorization"] == "Basic " + base64.b64encode(b"ls:hook-secret").decode()

    # Label Studio asks for predictions: /predict queues them, a worker pushes them through the API
    ls.actions.create(id="retrieve_tasks_predictions", project=project)

    def predicted() -> list | None:
        preds = {t["id"]: list(ls.predictions.list(task=t["id"])) for t in tasks}
        return preds if all(preds.values()) else None

    preds = _wait("a prediction on every task", predicted, timeout=180, poll=1.0)
    video_frames = {}
    for t in api.tasks(project):
        name = t["data"]["video"].rsplit("/", 1)[1]
        fps = 25.0 if name == "line_00705.mp4" else 10.0
        duration = 4.0 if fps == 25.0 else 6.0
        video_frames[t["id"]] = round(duration * 10)  # frames at the project's frameRate
        assert ("stllm_warning" in t["meta"]) == (fps == 25.0), t["meta"]
    for task_id, ps in preds.items():
        assert len(ps) == 1, f"task {task_id} has {len(ps)} predictions"  # never an empty one, never twice
        p = ps[0]
        assert p.model_version == "base" and 0.0 <= p.score <= 1.0
        for region in p.result:
            assert region["type"] == "timelinelabels" and region["from_name"] == "events"
            assert region["value"]["timelinelabels"][0] in ("jam", "hand") and 0.0 <= region["score"] <= 1.0
            for rng in region["value"]["ranges"]:
                assert (
                    isinstance(rng["start"], int) and 1 <= rng["start"] <= rng["end"] <= video_frames[task_id]
                )

    # `stllm labelstudio prelabel` finds nothing left to do for the served version
    out = _stllm(backend, "labelstudio", "prelabel", "--project", project)
    assert out.returncode == 0 and "0 without a prediction from base" in out.stderr, out.stderr

    # annotators correct the pre-labels: each annotation reaches the webhook, recorded with its prediction
    for t in tasks:
        pred = preds[t["id"]][0]
        ls.annotations.create(
            id=t["id"],
            parent_prediction=pred.id,
            result=[_region(5, 20, "jam")],
        )
    recorded = _wait("6 recorded annotations", lambda: len(_events(backend, "ANNOTATION_CREATED")) == 6, 30)
    assert recorded
    by_task = {r["task"]: r for r in _events(backend, "ANNOTATION_CREATED")}
    assert {t: r["parent_prediction"] for t, r in by_task.items()} == {
        t["id"]: preds[t["id"]][0].id for t in tasks
    }

    # "Start Training": the backend pulls the annotations and a round runs on the finetune queue
    ls.ml.train(id=ml.id)
    submitted = _wait("a submitted round", lambda: _events(backend, "ROUND_SUBMITTED"), timeout=60)[0]
    assert submitted["tasks"] == 6 and not submitted["skipped"]
    _wait("round-1 served", lambda: store.read()["serving"] == "round-1", timeout=240, poll=1.0)
    snapshot = store.read()["versions"]["round-1"]["snapshot"]
    frozen = json.loads((store.root / "snapshots" / f"{snapshot}.json").read_text())
    assert {v["source_ids"]["task"] for v in frozen["videos"]} == {t["id"] for t in tasks}
    assert frozen["sources"][0].endswith(f"/projects/{project}")
    # Label Studio's next request goes through /setup, which now names round-1: it asks for round-1's
    # predictions, and the workers (already serving round-1) push them beside the base ones
    ls.actions.create(id="retrieve_tasks_predictions", project=project)

    def round_1_everywhere() -> bool:
        return all(
            {p.model_version for p in ls.predictions.list(task=t["id"])} == {"base", "round-1"} for t in tasks
        )

    assert _wait("round-1 predictions on every task", round_1_everywhere, timeout=180, poll=1.0)


def test_round_start_from_labelstudio_on_the_command_line(label_studio, backend, store, media):
    """`stllm round start --from-labelstudio PROJECT` through the pool: a project's corrections, a new round."""
    project, tasks = _project_with_media(label_studio, media, "line QA, command line")
    for t in tasks:
        label_studio.client.annotations.create(id=t["id"], result=[_region(5, 20, "jam")])
    serving, expected = store.read()["serving"], _next_round(store)
    out = _stllm(
        backend, "round", "start", "--from-labelstudio", project, "--steps", 2, "--batch-size", 2, "--force"
    )
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
    result = json.loads(out.stdout)
    assert result["version"] == expected and result["promoted"]
    assert "6 videos" in out.stderr  # the snapshot line: every annotated task
    assert store.read()["versions"][expected]["parent"] == serving


def test_prelabel_command_covers_uploads_fetched_with_the_api_key(label_studio, backend, media):
    """A video uploaded into Label Studio (/data/upload/..., served only with the API key) is downloaded by
    the worker; `stllm labelstudio prelabel` gives every task a prediction from the served version."""
    import httpx

    ls = label_studio.client
    project, _ = _project_with_media(label_studio, media, "line QA, uploads")
    store = backend["store"]
    served = store.read()["serving"]
    upload = sorted((media / "line").glob("*.mp4"))[0]
    with open(upload, "rb") as f:
        r = httpx.post(
            f"{label_studio.url}/api/projects/{project}/import",
            headers={"Authorization": f"Token {TOKEN}"},
            files={"file": ("uploaded.mp4", f, "video/mp4")},
            timeout=60,
        )
    assert r.status_code == 201, r.text
    tasks = label_studio.tasks(project)
    uploaded = [t for t in tasks if t["data"]["video"].startswith("/data/upload/")]
    assert len(tasks) == 7 and len(uploaded) == 1
    out = _stllm(backend, "labelstudio", "prelabel", "--project", project)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert (summary["version"], summary["done"], summary["failed"]) == (served, 7, 0)
    for t in label_studio.tasks(project):
        assert served in t["prediction_versions"], t

    # its correction goes into the next round: the rounds worker fetches the upload with its own key
    task_id = uploaded[0]["id"]
    for t in tasks:
        ls.annotations.create(id=t["id"], result=[_region(2, 12, "hand")])
    connected = _stllm(
        backend, "labelstudio", "connect", "--project", project, "--backend-url", backend["url"]
    )
    assert connected.returncode == 0, connected.stderr
    ml = list(ls.ml.list(project=project))[0]
    submitted, expected = len(_events(backend, "ROUND_SUBMITTED")), _next_round(store)
    ls.ml.train(id=ml.id)
    _wait("a round submitted", lambda: len(_events(backend, "ROUND_SUBMITTED")) == submitted + 1, timeout=60)
    _wait(f"{expected} recorded", lambda: expected in store.read()["versions"], timeout=240, poll=1.0)
    snapshot = store.read()["versions"][expected]["snapshot"]
    frozen = json.loads((store.root / "snapshots" / f"{snapshot}.json").read_text())
    ours = {v["source_ids"]["task"] for v in frozen["videos"] if v["source_ids"]["project"] == project}
    assert task_id in ours and len(ours) == 7  # with the earlier projects' corrections: rounds accumulate
    assert (
        TOKEN not in json.dumps(frozen) and TOKEN not in (backend["state"] / "corrections.jsonl").read_text()
    )


def test_a_bad_annotation_never_blocks_a_round_and_presses_coalesce(label_studio, backend, store, media):
    """On the real server: one annotation with a reversed range and one starting at frame 0 are skipped with
    their reasons and the round runs on the rest; three presses of "Start Training" make one round."""
    ls = label_studio.client
    project, tasks = _project_with_media(label_studio, media, "line QA, bad annotations")
    bad = {tasks[0]["id"]: _region(20, 5, "jam"), tasks[1]["id"]: _region(0, 5, "hand")}
    for t in tasks:
        ls.annotations.create(id=t["id"], result=[bad.get(t["id"], _region(5, 20, "jam"))])
    connected = _stllm(
        backend, "labelstudio", "connect", "--project", project, "--backend-url", backend["url"]
    )
    assert connected.returncode == 0, connected.stderr
    ml = list(ls.ml.list(project=project))[0]
    expected = _next_round(store)
    for _ in range(3):
        ls.ml.train(id=ml.id)

    def ours() -> list[dict]:
        return [r for r in _events(backend, "ROUND_SUBMITTED") if r["project"] == project]

    submitted = _wait("a round submitted", ours, timeout=60)[0]
    assert submitted["tasks"] == 4
    reasons = {x["task"]: x["reason"] for x in submitted["skipped"]}
    assert set(reasons) == set(bad) and "before it starts" in reasons[tasks[0]["id"]]
    assert "from 1" in reasons[tasks[1]["id"]]
    _wait(f"{expected} recorded", lambda: expected in store.read()["versions"], timeout=240, poll=1.0)
    assert len(ours()) == 1  # the three presses made one round


def test_review_queue_orders_tasks_by_uncertainty_in_label_studio(label_studio, backend, media):
    """Predictions carry 1 - the video's uncertainty as their score; `stllm labelstudio queue --view` lists the
    unannotated tasks most uncertain first and adds a Data Manager tab that Label Studio orders the same way."""
    from workers.labelstudio.config import parse_label_config
    from workers.labelstudio.timeline import prediction_from_result

    api, ls = label_studio, label_studio.client
    project, tasks = _project_with_media(label_studio, media, "line QA, review queue")
    config = parse_label_config(CONFIG)
    uncertainty = {t["id"]: u for t, u in zip(tasks, (0.3, 0.9, 0.1, 0.6, 0.75, 0.45), strict=True)}
    segment = {"label": "jam", "start_s": 0.5, "end_s": 2.0, "first_frame": 6, "last_frame": 20, "score": 0.8}
    for t in tasks:
        result = {
            "meta": {"duration": 4.0, "fps": 10.0, "n_frames": 40},
            "segments": [{**segment, "uncertainty": uncertainty[t["id"]]}],
            "model_version": "base",
            "uncertainty": uncertainty[t["id"]],
        }
        prediction = prediction_from_result(result, config)
        assert prediction["score"] == pytest.approx(1 - uncertainty[t["id"]])
        assert prediction["result"][0]["score"] == 0.8  # the region keeps its own score
        api.push_prediction(t["id"], prediction, CONFIG)
    annotated = tasks[1]["id"]  # the most uncertain one is already done: it is not queued
    ls.annotations.create(id=annotated, result=[_region(5, 20, "jam")])

    out = _stllm(backend, "labelstudio", "queue", "--project", project, "--top", 3, "--view", "--json")
    assert out.returncode == 0, out.stderr
    queued = json.loads(out.stdout)
    expected = sorted((t for t in uncertainty if t != annotated), key=lambda t: -uncertainty[t])
    assert [r["task"] for r in queued["tasks"]] == expected[:3]
    assert [r["uncertainty"] for r in queued["tasks"]] == [uncertainty[t] for t in expected[:3]]

    # the Data Manager tab: Label Studio itself filters out the annotated task and returns the rest lowest
    # prediction score (most uncertain) first, the scores being the queued version's
    page = list(ls.tasks.list(project=project, view=queued["view"], fields="all"))
    assert [t.id for t in page] == expected
    assert [t.predictions_score for t in page] == pytest.approx([1 - uncertainty[t] for t in expected])
    tab = ls.views.get(id=str(queued["view"]))
    assert tab.data["ordering"] == ["tasks:predictions_score"] and tab.data["title"] == "Review next (stllm)"
    assert ls.projects.get(id=project).model_version == "base"
