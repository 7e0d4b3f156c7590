"""The Label Studio ML-backend protocol as a small Flask app.

    GET  /health, /           {"status": "UP", "model_version"}            cheap: Label Studio allows 1 s
    POST /setup               {"model_version"} or 400 for a config it cannot serve
    POST /predict             predictions the workers already made for these tasks and the served version;
                              the rest are enqueued (never run inside the request)
    POST /webhook             annotation events recorded (deduplicated) for the next round; 4xx for bad payloads
    GET  /metrics             request and event counters

Settings (environment): STLLM_LS_STATE (folder for the prediction cache and the corrections log, default
.stllm/labelstudio), LOCAL_FILES_DOCUMENT_ROOT, STLLM_LS_BASIC_AUTH_USER / STLLM_LS_BASIC_AUTH_PASSWORD,
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

from labelstudio_backend.config import ConfigError, parse_label_config
from labelstudio_backend.media import MediaError, resolve_local
from workers.sinks import JsonlSink

log = logging.getLogger("stllm.labelstudio")
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


def create_app(settings: BackendSettings | None = None) -> Flask:
    s = settings or BackendSettings()
    s.state.mkdir(parents=True, exist_ok=True)
    predictions = JsonlSink(s.state / "predictions.jsonl")
    corrections = JsonlSink(s.state / "corrections.jsonl")
    seen_lock = threading.Lock()
    metrics: Counter = Counter()
    background = ThreadPoolExecutor(max_workers=1)  # embedded default: jobs run beside the requests
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
        return jsonify({"model_version": served_version()})

    @app.post("/predict")
    def predict():
        body = _json_body()
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not all(isinstance(t, dict) and "id" in t for t in tasks):
            raise BadRequest("'tasks' must be a list of task objects with an 'id'")
        config = parse_label_config(body.get("label_config") or "")
        version = served_version()
        cached = {(r["video"], r["model_version"]): r["prediction"] for r in predictions.read()}
        results, missing = [], {}
        for t in tasks:
            hit = cached.get((f"task:{t['id']}", version))
            results.append(hit or {"result": [], "score": 0.0, "model_version": version})
            if hit is None:
                try:
                    missing[
                        str(resolve_local((t.get("data") or {}).get(config.video_key, ""), s.document_root))
                    ] = t["id"]
                except MediaError as e:
                    log.warning("task %s: %s", t["id"], e)
                    metrics["media errors"] += 1
        if missing:
            _enqueue(missing, body["label_config"])
        return jsonify({"results": results, "model_version": version})

    def _enqueue(missing: dict[str, int], label_config: str) -> None:
        from workers import client
        from workers.app import broker_url

        config = parse_label_config(label_config)
        sink = {
            "kind": "labelstudio-cache",
            "path": str(predictions.path),
            "config": label_config,
            "tasks": missing,
        }

        def submit() -> str:
            return client.submit_prelabel(list(missing), [x.model_dump() for x in config.labels], sink=sink)

        metrics["tasks enqueued"] += len(missing)
        if broker_url():
            submit()
        else:
            background.submit(submit)

    @app.post("/webhook")
    def webhook():
        body = _json_body()
        action = body.get("action")
        if action not in ACTIONS:
            raise BadRequest(f"unknown action {action!r}; accepted: {sorted(ACTIONS)}")
        metrics[f"webhook {action}"] += 1
        project = body.get("project") or {}
        if action == "START_TRAINING":
            if "id" not in project:
                raise BadRequest("START_TRAINING needs the project")
            corrections.write(
                [
                    {
                        "video": f"train:{project['id']}:{time.time()}",
                        "model_version": "-",
                        "action": action,
                        "project": project["id"],
                        "at": time.time(),
                    }
                ]
            )
            return jsonify({"status": "training requested", "project": project["id"]}), 201
        annotations = (
            body.get("annotations") if action in ("ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED") else None
        )
        if annotations is None:
            annotations = [body.get("annotation")]
        if not annotations or not all(isinstance(a, dict) and "id" in a for a in annotations):
            raise BadRequest(f"{action} needs annotation objects with an 'id'")
        task = body.get("task") or {}
        records = []
        with seen_lock:
            for a in annotations:
                key = f"annotation:{a['id']}"
                stamp = a.get("updated_at") or a.get("created_at") or ""
                records.append(
                    {
                        "video": key,
                        "model_version": str(stamp),
                        "action": action,
                        "project": project.get("id"),
                        "task": a.get("task", task.get("id")),
                        "annotation": a["id"],
                        "parent_prediction": a.get("parent_prediction"),
                        "origin": a.get("origin"),
                        "result": a.get("result", []),
                        "deleted": action == "ANNOTATIONS_DELETED",
                    }
                )
            corrections.write(records)  # the same annotation id and update time replaces, never doubles
        return jsonify({"status": "recorded", "count": len(records)}), 201

    @app.get("/metrics")
    def metrics_view():
        return Response(
            "".join(f"{k.replace(' ', '_')} {v}\n" for k, v in sorted(metrics.items())), mimetype="text/plain"
        )

    return app


def corrections_log(settings: BackendSettings | None = None) -> list[dict]:
    """The recorded webhook events, one per (annotation, update time)."""
    s = settings or BackendSettings()
    return JsonlSink(s.state / "corrections.jsonl").read()
