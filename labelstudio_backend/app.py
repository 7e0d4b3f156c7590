"""The Label Studio ML-backend protocol as a small Flask app.

    GET  /health, /           {"status": "UP", "model_version"}            cheap: Label Studio allows 1 s
    POST /setup               {"model_version"} or 400 for a config it cannot serve
    POST /predict             predictions the workers already made for these tasks and the served version;
                              the rest are enqueued (never run inside the request)
    POST /webhook             annotation events recorded (deduplicated) for the next round; START_TRAINING
                              pulls the project's annotations and submits a round; 4xx for bad payloads
    POST /train               the older training call with the annotated tasks inline: submits a round
    GET  /metrics             request and event counters

Settings (environment, see BackendSettings): STLLM_LS_STATE (folder for the prediction cache and the
corrections log, default .stllm/labelstudio), LOCAL_FILES_DOCUMENT_ROOT, STLLM_LS_BASIC_AUTH_USER /
STLLM_LS_BASIC_AUTH_PASSWORD, LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY (else learned from /setup),
STLLM_LS_ROUND_EVERY, STLLM_LS_ROUND_SETTINGS, STLLM_LS_ALLOWED_HOSTS, STLLM_LS_SEND_KEY, and
STLLM_MODEL_STORE / STLLM_MODEL (which version is served). Imports no torch.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from flask import Flask, Response, jsonify, request

from labelstudio_backend.api import pulled_from_tasks
from labelstudio_backend.config import ConfigError, parse_label_config
from labelstudio_backend.media import MediaError, media_source
from workers.sinks import AppendLog, JsonlSink

log = logging.getLogger("stllm.labelstudio")
# Label Studio's other webhook actions (a backend's webhook is sent all of them): accepted and ignored.
IGNORED_ACTIONS = {
    "PROJECT_CREATED",
    "PROJECT_UPDATED",
    "PROJECT_DELETED",
    "TASKS_CREATED",
    "TASKS_DELETED",
    "LABEL_LINK_CREATED",
    "LABEL_LINK_UPDATED",
    "LABEL_LINK_DELETED",
    "REVIEW_CREATED",
    "REVIEW_UPDATED",
    "REVIEWS_DELETED",
}
ACTIONS = {
    "ANNOTATION_CREATED",
    "ANNOTATION_UPDATED",
    "ANNOTATIONS_CREATED",
    "ANNOTATIONS_DELETED",
    "START_TRAINING",
}


@dataclass
class BackendSettings:
    state: Path = field(default_factory=lambda: Path(os.environ.get("STLLM_LS_STATE", ".stllm/labelstudio")))
    document_root: str | None = field(default_factory=lambda: os.environ.get("LOCAL_FILES_DOCUMENT_ROOT"))
    auth_user: str | None = field(default_factory=lambda: os.environ.get("STLLM_LS_BASIC_AUTH_USER"))
    auth_password: str | None = field(default_factory=lambda: os.environ.get("STLLM_LS_BASIC_AUTH_PASSWORD"))
    # Label Studio's API, where workers push predictions and START_TRAINING pulls annotations. Unset, the
    # URL and key that Label Studio sends with /setup are used.
    ls_url: str | None = field(default_factory=lambda: os.environ.get("LABEL_STUDIO_URL"))
    ls_api_key: str | None = field(default_factory=lambda: os.environ.get("LABEL_STUDIO_API_KEY"))
    # Start a fine-tune round after this many new corrections (0: only on START_TRAINING).
    round_every: int = field(default_factory=lambda: int(os.environ.get("STLLM_LS_ROUND_EVERY", "0")))
    # Round settings (RoundSettings.from_dict's JSON), e.g. '{"train": {"steps": 200}}'.
    round_settings: dict = field(
        default_factory=lambda: json.loads(os.environ.get("STLLM_LS_ROUND_SETTINGS", "{}"))
    )
    # Hosts (besides Label Studio itself) whose http(s) media URLs workers may download.
    allowed_hosts: frozenset[str] = field(
        default_factory=lambda: frozenset(
            h.strip() for h in os.environ.get("STLLM_LS_ALLOWED_HOSTS", "").split(",") if h.strip()
        )
    )
    # Whether queued jobs carry the API key (STLLM_LS_SEND_KEY=0: workers have LABEL_STUDIO_API_KEY themselves).
    send_key: bool = field(default_factory=lambda: os.environ.get("STLLM_LS_SEND_KEY", "1") != "0")
    # /predict does not enqueue a task again within this many seconds of enqueueing it.
    requeue_after_s: float = 600.0

    def connection(self) -> tuple[str | None, str | None]:
        """(Label Studio URL, API key): the configured ones, else those learned from /setup."""
        learned = {}
        path = self.state / "connection.json"
        if (not self.ls_url or not self.ls_api_key) and path.is_file():
            learned = json.loads(path.read_text())
        return self.ls_url or learned.get("url"), self.ls_api_key or learned.get("api_key")

    def learn_connection(self, url: str | None, api_key: str | None) -> None:
        """Keep the URL and key Label Studio sent with /setup (readable by this user only)."""
        if not url or not api_key or (self.ls_url and self.ls_api_key):
            return
        path = self.state / "connection.json"
        body = json.dumps({"url": url, "api_key": api_key})
        if path.is_file() and path.read_text() == body:
            return
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(body)
        tmp.chmod(0o600)
        tmp.replace(path)


def served_version() -> str:
    """The version workers serve: the model store's serving version, else '<STLLM_MODEL>@base'."""
    from workers.registry import ModelStore

    if os.environ.get("STLLM_MODEL_STORE"):
        store = ModelStore()
        if store.exists():
            return store.serving()[0]
    model = os.environ.get("STLLM_MODEL", "builtin")
    meta = Path(model) / "stllm.json"  # a saved model directory names its own version
    return json.loads(meta.read_text()).get("version", "base") if meta.is_file() else f"{model}@base"


class BadRequest(ValueError):
    """A payload this backend rejects; becomes a 400 with the message."""


def _json_body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def enqueue_prelabel(
    tasks: list[dict], label_config: str, settings: BackendSettings, run_here=None
) -> tuple[str | None, list[dict]]:
    """Pre-label these Label Studio tasks (``{"id", "data"}``) on the pool: results go to the backend's
    prediction cache and, when a Label Studio URL and key are known, into Label Studio as predictions.

    Returns (job id or None when nothing could be queued, [{"task", "reason"}] for tasks whose media
    cannot be opened). ``run_here`` (a callable taking a function) runs the job in the embedded default,
    where no broker is configured; without it the job runs before this returns."""
    from workers import client
    from workers.app import broker_url
    from workers.sinks import LabelStudioSink

    config = parse_label_config(label_config)
    url, key = settings.connection()
    videos, skipped = {}, []
    for t in tasks:
        try:
            source = (t.get("data") or {}).get(config.video_key, "")
            videos[media_source(source, t["id"], settings.document_root, url, settings.allowed_hosts)] = t[
                "id"
            ]
        except MediaError as e:
            skipped.append({"task": t["id"], "reason": str(e)})
    if not videos:
        return None, skipped
    key = key if settings.send_key else None  # workers then use their own LABEL_STUDIO_API_KEY
    sink = LabelStudioSink(str(settings.state / "predictions.jsonl"), label_config, videos, url, key)

    def submit() -> str:
        return client.submit_prelabel(
            list(videos), [x.model_dump() for x in config.labels], sink=sink.describe()
        )

    if broker_url() or run_here is None:
        return submit(), skipped
    run_here(submit)
    return "embedded", skipped


def start_round(pulled: dict, settings: BackendSettings) -> str:
    """Submit a fine-tune round on corrections pulled from Label Studio; returns the round's task id. The
    round's worker fetches uploaded media with the API key the job carries (unless STLLM_LS_SEND_KEY=0)."""
    from workers import client

    key = settings.connection()[1] if settings.send_key else None
    payload = {**pulled, "api_key": key} if key else pulled
    return client.submit_round({"labelstudio": payload}, settings.round_settings, None)


def create_app(settings: BackendSettings | None = None) -> Flask:
    """The backend as a Flask app (``stllm labelstudio serve`` runs it under gunicorn)."""
    s = settings or BackendSettings()
    s.state.mkdir(parents=True, exist_ok=True)
    predictions = JsonlSink(s.state / "predictions.jsonl")
    corrections = AppendLog(s.state / "corrections.jsonl")
    seen_lock = threading.Lock()
    metrics: Counter = Counter()
    enqueued: dict[tuple[int, str], float] = {}  # (task, version) -> when /predict last queued it
    background = ThreadPoolExecutor(max_workers=1)  # round pulls, and jobs in the embedded default
    app = Flask("stllm-labelstudio")

    @app.before_request
    def _auth():
        metrics[f"requests {request.path}"] += 1
        if s.auth_user and request.path not in ("/health", "/"):
            a = request.authorization
            if a is None or a.username != s.auth_user or a.password != s.auth_password:
                return Response("authentication required", 401, {"WWW-Authenticate": 'Basic realm="stllm"'})
        return None

    @app.errorhandler(BadRequest)
    @app.errorhandler(ConfigError)
    def _bad(e):
        metrics["rejected"] += 1
        return jsonify({"error": str(e)}), 400

    @app.get("/")
    @app.get("/health")
    def health():
        return jsonify({"status": "UP", "model_class": "ST-LLM", "model_version": served_version()})

    @app.post("/setup")
    def setup():
        body = _json_body()
        parse_label_config(body.get("schema") or "")
        s.learn_connection(body.get("hostname"), body.get("access_token"))
        return jsonify({"model_version": served_version()})

    @app.post("/predict")
    def predict():
        body = _json_body()
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not all(isinstance(t, dict) and "id" in t for t in tasks):
            raise BadRequest("'tasks' must be a list of task objects with an 'id'")
        parse_label_config(body.get("label_config") or "")
        version = served_version()
        cached = {(r["video"], r["model_version"]): r for r in predictions.read()}
        results, missing, now = [], [], time.time()
        for t in tasks:
            hit = cached.get((f"task:{t['id']}", version))
            # a task without a prediction yet gets an empty list: Label Studio then stores nothing for it
            # (an empty prediction would count as done); the worker pushes the real one when it is made
            results.append(hit["prediction"] if hit and "prediction" in hit else [])
            if hit is None and now - enqueued.get((t["id"], version), 0.0) > s.requeue_after_s:
                missing.append(t)
                enqueued[(t["id"], version)] = now
        if missing:
            _, skipped = enqueue_prelabel(missing, body["label_config"], s, background.submit)
            metrics["tasks enqueued"] += len(missing) - len(skipped)
            metrics["media errors"] += len(skipped)
            for x in skipped:
                log.warning("task %s: %s", x["task"], x["reason"])
        return jsonify({"results": results, "model_version": version})

    def _round_from_project(project: int, reason: str) -> None:
        """Pull the project's annotations and submit a round (runs off the request thread)."""
        from labelstudio_backend.api import LabelStudioAPI, pull_corrections

        try:
            url, key = s.connection()
            pulled = pull_corrections(
                LabelStudioAPI.from_env(url, key), project, s.document_root, s.allowed_hosts
            )
            _record_round(project, reason, pulled)
        except Exception as e:  # the webhook already answered: log and record why no round started
            log.error("round for project %s not started: %s", project, e)
            _record({"action": "ROUND_FAILED", "project": project, "reason": reason, "error": str(e)})

    def _record_round(project: int | None, reason: str, pulled: dict) -> None:
        round_id = start_round(pulled, s)
        log.info(
            "round %s submitted for project %s (%s): %d tasks",
            round_id,
            project,
            reason,
            len(pulled["tasks"]),
        )
        _record(
            {
                "action": "ROUND_SUBMITTED",
                "project": project,
                "reason": reason,
                "round": round_id,
                "tasks": len(pulled["tasks"]),
                "skipped": pulled.get("skipped", []),
            }
        )

    def _record(event: dict) -> None:
        corrections.write(
            [{"video": f"event:{time.time_ns()}", "model_version": "-", "at": time.time(), **event}]
        )

    def _maybe_round(project: int | None) -> None:
        if not s.round_every or project is None:
            return
        events = [r for r in corrections.read() if r.get("project") == project]
        last = max((i for i, r in enumerate(events) if r["action"] in ("ROUND_REQUESTED",)), default=-1)
        new = {r["annotation"] for r in events[last + 1 :] if "annotation" in r and not r.get("deleted")}
        if len(new) >= s.round_every:
            _record(
                {"action": "ROUND_REQUESTED", "project": project, "reason": f"{len(new)} new corrections"}
            )
            background.submit(_round_from_project, project, f"{len(new)} new corrections")

    @app.post("/webhook")
    def webhook():
        body = _json_body()
        action = body.get("action")
        if action in IGNORED_ACTIONS:
            metrics[f"webhook {action}"] += 1
            return jsonify({"status": "ignored", "action": action}), 200
        if action not in ACTIONS:
            raise BadRequest(f"unknown action {action!r}; accepted: {sorted(ACTIONS)}")
        metrics[f"webhook {action}"] += 1
        project = body.get("project") or {}
        if not isinstance(project, dict):
            raise BadRequest("'project' must be an object")
        if action == "START_TRAINING":
            if not isinstance(project.get("id"), int):
                raise BadRequest("START_TRAINING needs the project with its id")
            _record({"action": "ROUND_REQUESTED", "project": project["id"], "reason": action})
            background.submit(_round_from_project, project["id"], action)
            return jsonify({"status": "training requested", "project": project["id"]}), 201
        annotations = (
            body.get("annotations") if action in ("ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED") else None
        )
        if annotations is None:
            annotations = [body.get("annotation")]
        if not isinstance(annotations, list) or not annotations:
            raise BadRequest(f"{action} needs annotation objects with an 'id'")
        if not all(isinstance(a, dict) and "id" in a for a in annotations):
            raise BadRequest(f"{action} needs annotation objects with an 'id'")
        task = body.get("task") if isinstance(body.get("task"), dict) else {}
        records = []
        with seen_lock:
            for a in annotations:
                stamp = a.get("updated_at") or a.get("created_at") or ""
                records.append(
                    {
                        "video": f"annotation:{a['id']}",
                        "model_version": str(stamp),
                        "action": action,
                        "project": project.get("id", a.get("project")),
                        "task": a.get("task", task.get("id")),
                        "annotation": a["id"],
                        "parent_prediction": a.get("parent_prediction"),
                        "origin": a.get("origin"),
                        "result": a.get("result", []),
                        "deleted": action == "ANNOTATIONS_DELETED",
                    }
                )
            corrections.write(records)  # the same annotation id and update time counts once
            _maybe_round(records[0]["project"])
        return jsonify({"status": "recorded", "count": len(records)}), 201

    @app.post("/train")
    def train():
        """The older training call (Label Studio without START_TRAINING webhooks): the tasks with their
        annotations come inline."""
        body = _json_body()
        tasks = body.get("annotations")
        if not isinstance(tasks, list) or not all(isinstance(t, dict) and "id" in t for t in tasks):
            raise BadRequest("'annotations' must be the list of annotated tasks")
        xml = body.get("label_config") or ""
        config = parse_label_config(xml)
        project = str(body.get("project", "")).split(".")[0]
        pulled = pulled_from_tasks(tasks, config, s.document_root, s.connection()[0], s.allowed_hosts)
        pulled.update(project=int(project) if project.isdigit() else project, url=s.connection()[0] or "")
        background.submit(_record_round, pulled["project"], "train call", pulled)
        return jsonify({"status": "training requested", "tasks": len(pulled["tasks"])}), 201

    @app.get("/metrics")
    def metrics_view():
        return Response(
            "".join(f"{k.replace(' ', '_')} {v}\n" for k, v in sorted(metrics.items())), mimetype="text/plain"
        )

    return app


def corrections_log(settings: BackendSettings | None = None) -> list[dict]:
    """The recorded webhook events (one per annotation and update time) and round events."""
    s = settings or BackendSettings()
    return AppendLog(s.state / "corrections.jsonl").read()
