"""What the Label Studio ML backend does for each call, behind the thin routes of ``app.py``.

State lives in ``BackendSettings.state``: the prediction cache the workers fill (``predictions.jsonl``) and
the corrections log (``corrections.jsonl``: one record per annotation and update time, plus round events).
Imports no torch: jobs go to the pool through ``workers.pool.client``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from workers.labelstudio.config import parse_label_config
from workers.labelstudio.jobs import enqueue_prelabel, start_round
from workers.labelstudio.rest import LabelStudioAPI, pull_corrections, pulled_from_tasks
from workers.labelstudio.settings import BackendSettings
from workers.pool.client import served_version
from workers.sinks.files import AppendLog, JsonlSink

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


class BadRequest(ValueError):
    """A payload this backend rejects; becomes a 400 with the message."""


def corrections_log(settings: BackendSettings | None = None) -> list[dict]:
    """The recorded webhook events (one per annotation and update time) and round events."""
    s = settings or BackendSettings()
    return AppendLog(s.state / "corrections.jsonl").read()


class Backend:
    """One backend process's state: its settings, caches, counters and a background thread for round pulls
    (and jobs, in the embedded default)."""

    def __init__(self, settings: BackendSettings | None = None):
        self.s = settings or BackendSettings()
        self.s.state.mkdir(parents=True, exist_ok=True)
        self.predictions = JsonlSink(self.s.state / "predictions.jsonl")
        self.corrections = AppendLog(self.s.state / "corrections.jsonl")
        self.metrics: Counter = Counter()
        self._lock = threading.Lock()
        self._enqueued: dict[tuple[int, str], float] = {}  # (task, version) -> when /predict last queued it
        self.background = ThreadPoolExecutor(max_workers=1)

    # ------------------------------------------------------------------ calls
    def setup(self, body: dict) -> dict:
        parse_label_config(body.get("schema") or "")
        self.s.learn_connection(body.get("hostname"), body.get("access_token"))
        return {"model_version": served_version()}

    def predict(self, body: dict) -> dict:
        """Predictions the workers already made for these tasks and the served version; the rest enqueued."""
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not all(isinstance(t, dict) and "id" in t for t in tasks):
            raise BadRequest("'tasks' must be a list of task objects with an 'id'")
        parse_label_config(body.get("label_config") or "")
        version = served_version()
        cached = {(r["video"], r["model_version"]): r for r in self.predictions.read()}
        results, missing, now = [], [], time.time()
        for t in tasks:
            hit = cached.get((f"task:{t['id']}", version))
            # a task without a prediction yet gets an empty list: Label Studio then stores nothing for it
            # (an empty prediction would count as done); the worker pushes the real one when it is made
            results.append(hit["prediction"] if hit and "prediction" in hit else [])
            if hit is None and now - self._enqueued.get((t["id"], version), 0.0) > self.s.requeue_after_s:
                missing.append(t)
                self._enqueued[(t["id"], version)] = now
        if missing:
            _, skipped = enqueue_prelabel(missing, body["label_config"], self.s, self.background.submit)
            self.metrics["tasks enqueued"] += len(missing) - len(skipped)
            self.metrics["media errors"] += len(skipped)
            for x in skipped:
                log.warning("task %s: %s", x["task"], x["reason"])
        return {"results": results, "model_version": version}

    def webhook(self, body: dict) -> tuple[dict, int]:
        action = body.get("action")
        if action in IGNORED_ACTIONS:
            self.metrics[f"webhook {action}"] += 1
            return {"status": "ignored", "action": action}, 200
        if action not in ACTIONS:
            raise BadRequest(f"unknown action {action!r}; accepted: {sorted(ACTIONS)}")
        self.metrics[f"webhook {action}"] += 1
        project = body.get("project") or {}
        if not isinstance(project, dict):
            raise BadRequest("'project' must be an object")
        if action == "START_TRAINING":
            if not isinstance(project.get("id"), int):
                raise BadRequest("START_TRAINING needs the project with its id")
            self._record({"action": "ROUND_REQUESTED", "project": project["id"], "reason": action})
            self.background.submit(self._round_from_project, project["id"], action)
            return {"status": "training requested", "project": project["id"]}, 201
        records = self._annotation_records(action, body, project)
        with self._lock:
            self.corrections.write(records)  # the same annotation id and update time counts once
            self._maybe_round(records[0]["project"])
        return {"status": "recorded", "count": len(records)}, 201

    def train(self, body: dict) -> dict:
        """The older training call (Label Studio without START_TRAINING webhooks): the tasks with their
        annotations come inline."""
        tasks = body.get("annotations")
        if not isinstance(tasks, list) or not all(isinstance(t, dict) and "id" in t for t in tasks):
            raise BadRequest("'annotations' must be the list of annotated tasks")
        config = parse_label_config(body.get("label_config") or "")
        project = str(body.get("project", "")).split(".")[0]
        url = self.s.connection()[0]
        pulled = pulled_from_tasks(tasks, config, self.s.document_root, url, self.s.allowed_hosts)
        pulled.update(project=int(project) if project.isdigit() else project, url=url or "")
        self.background.submit(self._submit_round, pulled["project"], "train call", pulled)
        return {"status": "training requested", "tasks": len(pulled["tasks"])}

    # ------------------------------------------------------------------ corrections and rounds
    @staticmethod
    def _annotation_records(action: str, body: dict, project: dict) -> list[dict]:
        bulk = action in ("ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED")
        annotations = body.get("annotations") if bulk else None
        if annotations is None:
            annotations = [body.get("annotation")]
        if not isinstance(annotations, list) or not annotations:
            raise BadRequest(f"{action} needs annotation objects with an 'id'")
        if not all(isinstance(a, dict) and "id" in a for a in annotations):
            raise BadRequest(f"{action} needs annotation objects with an 'id'")
        task = body.get("task") if isinstance(body.get("task"), dict) else {}
        records = []
        for a in annotations:
            stamp = a.get("updated_at") or a.get("created_at") or ""
            records.append(
                {
                    "id": f"annotation:{a['id']}@{stamp}",
                    "action": action,
                    "project": project.get("id", a.get("project")),
                    "task": a.get("task", task.get("id")),
                    "annotation": a["id"],
                    "updated": str(stamp),
                    "parent_prediction": a.get("parent_prediction"),
                    "origin": a.get("origin"),
                    "result": a.get("result", []),
                    "deleted": action == "ANNOTATIONS_DELETED",
                }
            )
        return records

    def _record(self, event: dict) -> None:
        self.corrections.write([{"id": f"event:{time.time_ns()}", "at": time.time(), **event}])

    def _maybe_round(self, project: int | None) -> None:
        if not self.s.round_every or project is None:
            return
        events = [r for r in self.corrections.read() if r.get("project") == project]
        last = max((i for i, r in enumerate(events) if r["action"] == "ROUND_REQUESTED"), default=-1)
        new = {r["annotation"] for r in events[last + 1 :] if "annotation" in r and not r.get("deleted")}
        if len(new) >= self.s.round_every:
            reason = f"{len(new)} new corrections"
            self._record({"action": "ROUND_REQUESTED", "project": project, "reason": reason})
            self.background.submit(self._round_from_project, project, reason)

    def _round_from_project(self, project: int, reason: str) -> None:
        """Pull the project's annotations and submit a round (runs off the request thread)."""
        try:
            url, key = self.s.connection()
            pulled = pull_corrections(
                LabelStudioAPI.from_env(url, key), project, self.s.document_root, self.s.allowed_hosts
            )
            self._submit_round(project, reason, pulled)
        except Exception as e:  # the webhook already answered: log and record why no round started
            log.error("round for project %s not started: %s", project, e)
            self._record({"action": "ROUND_FAILED", "project": project, "reason": reason, "error": str(e)})

    def _submit_round(self, project: int | None, reason: str, pulled: dict) -> None:
        round_id = start_round(pulled, self.s)
        log.info(
            "round %s submitted for project %s (%s): %d tasks",
            round_id,
            project,
            reason,
            len(pulled["tasks"]),
        )
        self._record(
            {
                "action": "ROUND_SUBMITTED",
                "project": project,
                "reason": reason,
                "round": round_id,
                "tasks": len(pulled["tasks"]),
                "skipped": pulled.get("skipped", []),
            }
        )
