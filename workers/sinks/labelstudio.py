"""Pre-labels for Label Studio tasks: the backend's prediction cache, and pushes through Label Studio's API."""

from __future__ import annotations

import logging

from workers.labelstudio.config import parse_label_config
from workers.labelstudio.rest import LabelStudioAPI, LabelStudioError
from workers.labelstudio.timeline import prediction_from_result, timing_warning
from workers.schemas import LabelStudioSinkSpec
from workers.sinks.files import SqliteStore

log = logging.getLogger("stllm.sinks")


class LabelStudioSink:
    """Pre-labels for Label Studio tasks: converted to timelinelabels predictions at the project's frame rate,
    kept where the backend's /predict serves them (one per task and model version), and, when ``url`` is
    set, pushed to Label Studio through its API (validated against the config first; skipped where the task
    already has a prediction of that version, so a redelivered task does not double it).

    A video with a variable frame rate, or whose frame rate differs from the project's ``frameRate``, gets
    its task flagged (``meta.stllm_warning``) and the warning kept with the prediction. A push that fails is
    logged and recorded in the cache entry (``push_error``); the other videos go on."""

    def __init__(self, spec: LabelStudioSinkSpec):
        self.cache, self.config, self.tasks = SqliteStore(spec.path), spec.config, spec.tasks
        self.url, self.api_key = spec.url, spec.api_key
        self._api = None  # one Label Studio client for all of a job's pushes

    def write(self, records: list[dict]) -> None:
        cfg = parse_label_config(self.config)
        out = []
        for r in records:
            for task in self.tasks.get(r["video"], []):  # every task on this video gets its prediction
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
