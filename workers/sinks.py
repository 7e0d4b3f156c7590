"""Where tasks write their results. Every sink is idempotent: writing the same video and model version
again replaces the earlier result, so a redelivered task never doubles a result."""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path

log = logging.getLogger("stllm.sinks")


def _key(record: dict) -> tuple[str, str]:
    return record["video"], record["model_version"]


class JsonlSink:
    """A JSON-lines file, one object per (video, model version). Safe for several worker processes on one
    machine or a shared file system with working locks: each write takes an exclusive lock, drops a line
    with the same key, appends, and renames a complete new file into place."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def describe(self) -> dict:
        return {"kind": "jsonl", "path": str(self.path)}

    def write(self, records: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            existing = self.read()
            keys = {_key(r) for r in records}
            kept = [r for r in existing if _key(r) not in keys] + records
            tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
            with open(tmp, "w") as f:
                for r in kept:
                    f.write(json.dumps(r) + "\n")
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(self.path)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]


class AppendLog:
    """A JSON-lines log that only appends (constant time per write, however long the log); reading keeps
    the last record per (video, model version), so a repeated event counts once."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def write(self, records: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = "".join(json.dumps(r) + "\n" for r in records)
        with open(self.path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # one writer at a time: lines never interleave
            f.write(body)
            f.flush()

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        latest: dict[tuple[str, str], dict] = {}
        with open(self.path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    latest.pop(_key(r), None)
                    latest[_key(r)] = r
        return list(latest.values())


class FiftyOneSink:
    """Writes results onto a FiftyOne dataset's samples, by sample id, in bulk.

    prelabel -> ``<field>``: TemporalDetections (label, 1-based support, confidence, model_version on each);
                a rerun replaces the detections of the same model version and keeps other versions'.
    ask      -> ``<field>`` answer text, ``<field>_p_yes`` (a sortable number), ``<field>_moment``
                (TemporalDetection), ``<field>_version``.
    both     -> ``<field>_error``: why a video failed, None when it did not.
    FiftyOne is imported when the first result is written, inside the worker.
    """

    def __init__(self, dataset: str, field: str, job: str, ids: dict[str, str]):
        self.dataset, self.field, self.job, self.ids = dataset, field, job, ids

    def describe(self) -> dict:
        return {
            "kind": "fiftyone",
            "dataset": self.dataset,
            "field": self.field,
            "job": self.job,
            "ids": self.ids,
        }

    def write(self, records: list[dict]) -> None:
        import fiftyone as fo

        ds = fo.load_dataset(self.dataset)
        rows = [(self.ids[r["video"]], r) for r in records if r["video"] in self.ids]
        if not rows:
            return
        schema = ds.get_field_schema()

        def ensure(name: str, ftype, **kwargs) -> None:  # all-None values cannot type a new field
            if name not in schema:
                ds.add_sample_field(name, ftype, **kwargs)

        ensure(f"{self.field}_error", fo.StringField)
        if self.job == "prelabel":
            ensure(self.field, fo.EmbeddedDocumentField, embedded_doc_type=fo.TemporalDetections)
        else:
            ensure(self.field, fo.StringField)
            ensure(f"{self.field}_p_yes", fo.FloatField)
            ensure(f"{self.field}_moment", fo.EmbeddedDocumentField, embedded_doc_type=fo.TemporalDetection)
            ensure(f"{self.field}_version", fo.StringField)
        sample_ids = [sid for sid, _ in rows]
        errors = {sid: r["error"] for sid, r in rows}
        if self.job == "prelabel":
            view = ds.select(sample_ids)
            current = (
                dict(zip(view.values("id"), view.values(self.field), strict=True))
                if self.field in ds.get_field_schema()
                else {}
            )
            values = {}
            for sid, r in rows:
                old = current.get(sid)
                kept = [
                    d
                    for d in (old.detections if old else [])
                    if d.get_field("model_version") != r["model_version"]
                ]
                new = [
                    fo.TemporalDetection(
                        label=s["label"],
                        support=[s["first_frame"], s["last_frame"]],
                        confidence=s["score"],
                        model_version=r["model_version"],
                    )
                    for s in r["segments"]
                ]
                values[sid] = fo.TemporalDetections(detections=kept + new) if r["error"] is None else old
            ds.set_values(self.field, values, key_field="id", dynamic=True)
        else:
            answers = {sid: r.get("answer") for sid, r in rows}
            p_yes = {sid: r.get("p_yes") for sid, r in rows}
            versions = {sid: r["model_version"] for sid, r in rows}
            moments = {}
            for sid, r in rows:
                m = r.get("moment")
                moments[sid] = (
                    fo.TemporalDetection(
                        label="moment", support=[m["first_frame"], m["last_frame"]], confidence=m["score"]
                    )
                    if m
                    else None
                )
            ds.set_values(self.field, answers, key_field="id")
            ds.set_values(f"{self.field}_p_yes", p_yes, key_field="id")
            ds.set_values(f"{self.field}_moment", moments, key_field="id")
            ds.set_values(f"{self.field}_version", versions, key_field="id")
        ds.set_values(f"{self.field}_error", errors, key_field="id")
        self._fill_metadata(ds, rows)

    @staticmethod
    def _fill_metadata(ds, rows: list[tuple[str, dict]]) -> None:
        """Video metadata from the worker's own probe (PyAV), for samples that have none: FiftyOne's
        compute_metadata needs ffprobe, which many machines lack, and TemporalDetection.from_timestamps
        and the App's timeline need frame rate and count."""
        import fiftyone as fo

        view = ds.select([sid for sid, _ in rows])
        have = dict(zip(view.values("id"), view.values("metadata"), strict=True))
        values = {}
        for sid, r in rows:
            meta = r.get("meta")
            if meta and have.get(sid) is None:
                values[sid] = fo.VideoMetadata(
                    frame_rate=meta["fps"], total_frame_count=meta["n_frames"], duration=meta["duration"]
                )
        if values:
            ds.set_values("metadata", values, key_field="id")


class LabelStudioSink:
    """Pre-labels for Label Studio tasks: converted to timelinelabels predictions at the project's frame rate,
    kept where the backend's /predict serves them (one per task and model version), and, when ``url`` is
    set, pushed to Label Studio through its API (validated against the config first; skipped where the task
    already has a prediction of that version, so a redelivered task does not double it).

    A video with a variable frame rate, or whose frame rate differs from the project's ``frameRate``, gets
    its task flagged (``meta.stllm_warning``) and the warning kept with the prediction. A push that fails is
    logged and recorded in the cache entry (``push_error``); the other videos go on."""

    def __init__(
        self,
        path: str,
        config: str,
        tasks: dict[str, int],
        url: str | None = None,
        api_key: str | None = None,
    ):
        self.cache, self.config, self.tasks = JsonlSink(path), config, tasks
        self.url, self.api_key = url, api_key
        self._api = None  # one Label Studio client for all of a job's pushes

    def describe(self) -> dict:
        return {
            "kind": "labelstudio",
            "path": str(self.cache.path),
            "config": self.config,
            "tasks": self.tasks,
            "url": self.url,
            "api_key": self.api_key,
        }

    def write(self, records: list[dict]) -> None:
        from labelstudio_backend.config import parse_label_config
        from labelstudio_backend.timeline import prediction_from_result, timing_warning

        cfg = parse_label_config(self.config)
        out = []
        for r in records:
            task = self.tasks.get(r["video"])
            if task is None:
                continue
            entry = {"video": f"task:{task}", "model_version": r["model_version"], "task": task}
            if r["error"] is not None:
                out.append({**entry, "error": r["error"]})
                continue
            entry["prediction"] = prediction_from_result(r, cfg)
            entry["warning"] = timing_warning(r["meta"], cfg)
            if self.url:
                entry.update(self._push(task, entry["prediction"], entry["warning"]))
            out.append(entry)
        if out:
            self.cache.write(out)

    def _push(self, task: int, prediction: dict, warning: str | None) -> dict:
        from labelstudio_backend.api import LabelStudioAPI, LabelStudioError

        try:
            if self._api is None:
                self._api = LabelStudioAPI.from_env(self.url, self.api_key)
            api = self._api
            if prediction["model_version"] in api.prediction_versions(task):
                return {"pushed": "already there"}
            if warning:  # flagged before the prediction shows, so nobody sees it unflagged
                api.flag_task(task, warning)
            return {"pushed": api.push_prediction(task, prediction, self.config)}
        except LabelStudioError as e:
            log.error("task %s: %s", task, e)
            return {"push_error": str(e)}


def sink_from(description: dict | None):
    """Rebuild a sink from its JSON description (what a job carries to the workers)."""
    if not description:
        return None
    kind = description.get("kind")
    if kind == "jsonl":
        return JsonlSink(description["path"])
    if kind == "labelstudio":
        return LabelStudioSink(
            description["path"],
            description["config"],
            description["tasks"],
            description.get("url"),
            description.get("api_key"),
        )
    if kind == "fiftyone":
        return FiftyOneSink(
            description["dataset"], description["field"], description["job"], description["ids"]
        )
    raise ValueError(f"unknown sink kind {kind!r}")
