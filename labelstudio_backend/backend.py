"""What the Label Studio ML backend does for each call, behind the thin routes of ``app.py``.

State lives in ``BackendSettings.state``: the prediction cache the workers fill (``predictions.sqlite``), the
corrections log (``corrections.jsonl``: one record per annotation and update time, plus round events) and
the round ledger (``rounds.sqlite``: what counts toward the next round, which rounds were requested).
Every field a client sends is type-checked where it enters: a wrong type is a 400 naming the field.
Imports no torch: jobs go to the pool through ``workers.pool.client``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from labelstudio_backend.ledger import RoundLedger
from workers.labelstudio.config import parse_label_config
from workers.labelstudio.jobs import PREDICTIONS, enqueue_prelabel, start_round
from workers.labelstudio.rest import LabelStudioAPI, pull_corrections, pulled_from_tasks
from workers.labelstudio.settings import BackendSettings
from workers.pool.client import served_version
from workers.sinks.files import AppendLog, SqliteStore

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


def _id(value: object, what: str) -> int:
    """A Label Studio id: an integer (not a bool, list, object or string)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{what} must be an integer id, got {type(value).__name__}")
    return value


def _object(value: object, what: str, default: dict | None = None) -> dict:
    if value is None and default is not None:
        return default
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be an object, got {type(value).__name__}")
    return value


def _task_list(value: object, what: str) -> list[dict]:
    """Tasks as Label Studio sends them: objects with an integer ``id`` and ``data`` an object of strings."""
    if not isinstance(value, list):
        raise BadRequest(f"'{what}' must be a list of task objects")
    for t in value:
        t = _object(t, f"every item of '{what}'")
        _id(t.get("id"), f"a task's 'id' in '{what}'")
        data = _object(t.get("data"), f"task {t['id']}: 'data'", default={})
        if not all(isinstance(v, str | int | float | bool | type(None) | dict | list) for v in data.values()):
            raise BadRequest(f"task {t['id']}: 'data' holds values that are not JSON")
    return value


def corrections_log(settings: BackendSettings | None = None) -> list[dict]:
    """The recorded webhook events (one per annotation and update time) and round events."""
    s = settings or BackendSettings()
    return AppendLog(s.state / "corrections.jsonl").read()


def snapshot_digest(pulled: dict) -> str:
    """What a round would train on, as a digest: the same corrections give the same digest."""
    tasks = sorted(pulled["tasks"], key=lambda t: t["task"])
    body = json.dumps({"labels": pulled["labels"], "tasks": tasks}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


class Backend:
    """One backend process's state: its settings, caches, counters and a background thread for round pulls
    (and jobs, in the embedded default). Round bookkeeping is shared with the machine's other backend
    processes (:class:`RoundLedger`); a round requested before a restart is submitted after it."""

    def __init__(self, settings: BackendSettings | None = None):
        self.s = settings or BackendSettings()
        self.s.state.mkdir(parents=True, exist_ok=True)
        self.predictions = SqliteStore(self.s.state / PREDICTIONS)
        self.corrections = AppendLog(self.s.state / "corrections.jsonl")
        self.ledger = RoundLedger(self.s.state / "rounds.sqlite")
        self.metrics: Counter = Counter()
        self._enqueued: dict[tuple[int, str], float] = {}  # (task, version) -> when /predict last queued it
        self.background = ThreadPoolExecutor(max_workers=1)
        for request_id, project, reason in self.ledger.open_requests():
            self.background.submit(self._round_from_project, request_id, project, f"{reason} (resumed)")

    # ------------------------------------------------------------------ calls
    def setup(self, body: dict, caller: str | None = None, authenticated: bool = False) -> dict:
        parse_label_config(_str(body.get("schema"), "'schema'"))
        try:
            outcome = self.s.learn_connection(
                body.get("hostname"), body.get("access_token"), caller, authenticated
            )
        except ValueError as e:
            raise BadRequest(str(e)) from e
        if outcome.startswith("not learned"):
            log.warning("/setup from %s: %s", caller, outcome)
            self.metrics["setup connection refused"] += 1
        return {"model_version": served_version()}

    def predict(self, body: dict) -> dict:
        """Predictions the workers already made for these tasks and the served version; the rest enqueued."""
        tasks = _task_list(body.get("tasks"), "tasks")
        label_config = _str(body.get("label_config"), "'label_config'")
        config = parse_label_config(label_config)
        for t in tasks:
            url = (t.get("data") or {}).get(config.video_key)
            if url is not None and not isinstance(url, str):
                raise BadRequest(f"task {t['id']}: the video URL must be a string, got {type(url).__name__}")
        version = served_version()
        cached = self.predictions.get([(f"task:{t['id']}", version) for t in tasks])  # these tasks' rows only
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
            _, skipped = enqueue_prelabel(missing, label_config, self.s, self.background.submit)
            self.metrics["tasks enqueued"] += len(missing) - len(skipped)
            self.metrics["media errors"] += len(skipped)
            for x in skipped:
                log.warning("task %s: %s", x["task"], x["reason"])
        return {"results": results, "model_version": version}

    def webhook(self, body: dict) -> tuple[dict, int]:
        action = body.get("action")
        if not isinstance(action, str):
            raise BadRequest("'action' must be a string")
        if action in IGNORED_ACTIONS:
            self.metrics[f"webhook {action}"] += 1
            return {"status": "ignored", "action": action}, 200
        if action not in ACTIONS:
            raise BadRequest(f"unknown action {action!r}; accepted: {sorted(ACTIONS)}")
        project = _object(body.get("project"), "'project'", default={})
        if action == "START_TRAINING":
            project_id = _id(project.get("id"), "START_TRAINING's project 'id'")
            self.metrics[f"webhook {action}"] += 1
            request_id = self.ledger.request(project_id, action)
            if request_id is None:
                return {"status": "a round is already requested", "project": project_id}, 200
            self._record({"action": "ROUND_REQUESTED", "project": project_id, "reason": action})
            self.background.submit(self._round_from_project, request_id, project_id, action)
            return {"status": "training requested", "project": project_id}, 201
        records = self._annotation_records(action, body, project)
        self.metrics[f"webhook {action}"] += 1
        self.corrections.write(records)  # durable before the answer: an acknowledged correction stays
        for r in records:
            if r["project"] is not None:
                self.ledger.record(r["project"], r["annotation"], r["updated"], r["deleted"])
        self._maybe_round(records[0]["project"])
        return {"status": "recorded", "count": len(records)}, 201

    def train(self, body: dict) -> dict:
        """The older training call (Label Studio without START_TRAINING webhooks): the tasks with their
        annotations come inline. Unusable annotations are skipped with their reason; a 400 when none is
        left."""
        tasks = _task_list(body.get("annotations"), "annotations")
        config = parse_label_config(_str(body.get("label_config"), "'label_config'"))
        project = body.get("project", "")
        if not isinstance(project, str | int) or isinstance(project, bool):
            raise BadRequest("'project' must be a string or an integer")
        project = str(project).split(".")[0]
        url = self.s.connection()[0]
        pulled = pulled_from_tasks(tasks, config, self.s.document_root, url, self.s.allowed_hosts)
        if not pulled["tasks"]:
            raise BadRequest(f"no usable annotation: {pulled['skipped'][:5]}")
        pulled.update(project=int(project) if project.isdigit() else project, url=url or "")
        self.background.submit(self._submit_round, pulled["project"], "train call", pulled)
        return {"status": "training requested", "tasks": len(pulled["tasks"]), "skipped": pulled["skipped"]}

    # ------------------------------------------------------------------ corrections and rounds
    @staticmethod
    def _annotation_records(action: str, body: dict, project: dict) -> list[dict]:
        bulk = action in ("ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED")
        annotations = body.get("annotations") if bulk else None
        if annotations is None:
            annotations = [body.get("annotation")]
        if not isinstance(annotations, list) or not annotations:
            raise BadRequest(f"{action} needs annotation objects with an 'id'")
        task = _object(body.get("task"), "'task'", default={})
        task_id = _id(task["id"], "the task's 'id'") if "id" in task else None
        project_id = _id(project["id"], "the project's 'id'") if project.get("id") is not None else None
        records = []
        for a in annotations:
            a = _object(a, f"{action}: every annotation")
            annotation = _id(a.get("id"), f"{action}: an annotation's 'id'")
            stamp = a.get("updated_at") or a.get("created_at") or ""
            if not isinstance(stamp, str):
                raise BadRequest(f"annotation {annotation}: 'updated_at' must be a string")
            result = a.get("result", [])
            if not isinstance(result, list):
                raise BadRequest(f"annotation {annotation}: 'result' must be a list")
            a_task = a.get("task", task_id)
            a_project = a.get("project", project_id) if project_id is None else project_id
            records.append(
                {
                    "id": f"annotation:{annotation}@{stamp}",
                    "action": action,
                    "project": _id(a_project, f"annotation {annotation}: 'project'")
                    if a_project is not None
                    else None,
                    "task": _id(a_task, f"annotation {annotation}: 'task'") if a_task is not None else None,
                    "annotation": annotation,
                    "updated": stamp,
                    "parent_prediction": a.get("parent_prediction"),
                    "origin": a.get("origin"),
                    "result": result,
                    "deleted": action == "ANNOTATIONS_DELETED",
                }
            )
        return records

    def _record(self, event: dict) -> None:
        self.corrections.write([{"id": f"event:{time.time_ns()}", "at": time.time(), **event}])

    def _maybe_round(self, project: int | None) -> None:
        if not self.s.round_every or project is None:
            return
        reason = f"{self.s.round_every} new corrections"
        request_id = self.ledger.request(project, reason, threshold=self.s.round_every)
        if request_id is not None:
            self._record({"action": "ROUND_REQUESTED", "project": project, "reason": reason})
            self.background.submit(self._round_from_project, request_id, project, reason)

    def _round_from_project(self, request_id: int, project: int, reason: str) -> None:
        """Pull the project's annotations and submit a round (runs off the request thread)."""
        if not self.ledger.claim(request_id):
            return  # another backend process has it
        try:
            url, key = self.s.connection()
            pulled = pull_corrections(
                LabelStudioAPI.from_env(url, key), project, self.s.document_root, self.s.allowed_hosts
            )
            self._submit_round(project, reason, pulled, request_id)
        except Exception as e:  # the webhook already answered: log and record why no round started
            log.error("round for project %s not started: %s", project, e)
            self.ledger.finish(request_id, "failed", error=str(e))
            self._record({"action": "ROUND_FAILED", "project": project, "reason": reason, "error": str(e)})

    def _submit_round(
        self, project: int | str | None, reason: str, pulled: dict, request_id: int | None = None
    ):
        skipped = pulled.get("skipped", [])
        for x in skipped:
            log.warning("round for project %s: task %s skipped: %s", project, x["task"], x["reason"])
        if not pulled["tasks"]:
            raise ValueError(f"no usable correction in project {project}: {skipped[:5]}")
        digest = snapshot_digest(pulled)
        if isinstance(project, int) and digest == self.ledger.last_digest(project):
            if request_id is not None:
                self.ledger.finish(request_id, "skipped", digest=digest)
            log.info("round for project %s not run: the corrections are those of its last round", project)
            self._record(
                {"action": "ROUND_SKIPPED", "project": project, "reason": "no change since the last round"}
            )
            return
        round_id = start_round(pulled, self.s)
        if request_id is not None:
            self.ledger.finish(request_id, "submitted", round_id=round_id, digest=digest)
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
                "skipped": skipped,
            }
        )


def _str(value: object, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a string, got {type(value).__name__}")
    return value
