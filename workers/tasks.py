"""Celery tasks: thin wrappers over the jobs in ``workers.jobs``. The model is loaded once per worker
process (``worker_process_init``), never per task. Each task handles a few videos of a job, reports
progress, writes its results through the job's sink and skips its remaining videos once the job is
cancelled."""

from __future__ import annotations

import logging
import os

from celery.signals import worker_process_init

from workers.app import app, broker_url, round_app
from workers.registry import ModelStore
from workers.sinks import sink_from

log = logging.getLogger("stllm.worker")
_model = None
_model_key: str | None = None


def _wanted_model() -> str:
    """The model directory this worker should serve now: the model store's serving version when
    STLLM_MODEL_STORE points at a store, else STLLM_MODEL (default builtin)."""
    if os.environ.get("STLLM_MODEL_STORE"):
        store = ModelStore()
        if store.exists():
            return str(store.serving()[1])
    return os.environ.get("STLLM_MODEL", "builtin")


def served_model():
    """The model this process serves. Loaded at process start in a worker; reloaded before a task when the
    model store has promoted (or rolled back to) another version since."""
    global _model, _model_key
    wanted = _wanted_model()
    if _model is None or wanted != _model_key:
        from workers.stllm.io import load_model

        previous = _model.version if _model is not None else None
        _model = load_model(
            wanted, device=os.environ.get("STLLM_DEVICE"), dtype=os.environ.get("STLLM_DTYPE", "auto")
        ).inference_weights()
        _model_key = wanted
        if previous:
            log.info("worker pid %d switched from %s to %s", os.getpid(), previous, _model.version)
        else:
            log.info("worker pid %d serves %s (version %s)", os.getpid(), wanted, _model.version)
    return _model


@worker_process_init.connect
def _load_model_at_start(**_) -> None:
    if os.environ.get("STLLM_WORKER_ROLE") != "rounds":  # a rounds worker loads what each round needs
        served_model()


def _cancel_key(job_id: str) -> str:
    return f"stllm:cancel:{job_id}"


def is_cancelled(job_id: str) -> bool:
    if broker_url() is None:  # embedded default: jobs run in the caller, which cancels by stopping
        return False
    backend = app.backend
    client = getattr(backend, "client", None)
    return bool(client is not None and client.get(_cancel_key(job_id)))


def _run(task, job_id: str, videos: list[str], sink: dict | None, fn) -> dict:
    """Run ``fn(videos, progress)`` (a job function from workers.jobs) over the task's videos in one call, so
    decoding the next video overlaps compute and pre-labeling batches windows across videos. Each result is
    written to the sink and reported as progress as it comes; a cancelled job stops taking videos."""
    results, done, failed = [], 0, 0
    out = sink_from(sink)
    if sink and sink.get("url") and sink.get("api_key"):  # Label Studio media is fetched with its key
        from workers.media import register_key

        register_key(sink["url"], sink["api_key"])

    def remaining():
        for video in videos:
            if is_cancelled(job_id):
                return
            yield video

    def record(result) -> None:
        nonlocal done, failed
        r = result.model_dump(mode="json")
        if out is not None:
            out.write([r])
        results.append(r)
        failed += r["error"] is not None
        done += r["error"] is None
        if task is not None and task.request.id:
            task.update_state(state="PROGRESS", meta={"done": done, "failed": failed, "total": len(videos)})

    fn(remaining(), record)
    if len(results) < len(videos):
        log.info("job %s cancelled: skipped %d videos", job_id, len(videos) - len(results))
    return {"results": results, "done": done, "failed": failed, "total": len(videos)}


@app.task(name="stllm.prelabel", bind=True, max_retries=2)
def prelabel(
    self, job_id: str, videos: list[str], labels: list[dict], settings: dict, sink: dict | None = None
):
    from workers.jobs import prelabel_videos
    from workers.schemas import PrelabelSettings, parse_labels

    model = served_model()
    vocab, s = parse_labels(labels), PrelabelSettings(**settings)
    return _run(self, job_id, videos, sink, lambda v, progress: prelabel_videos(model, v, vocab, s, progress))


@app.task(name="stllm.ask", bind=True, max_retries=2)
def ask(self, job_id: str, videos: list[str], question: str, settings: dict, sink: dict | None = None):
    from workers.jobs import ask_videos
    from workers.schemas import AskSettings

    model = served_model()
    s = AskSettings(**settings)
    return _run(self, job_id, videos, sink, lambda v, progress: ask_videos(model, v, question, s, progress))


@app.task(name="stllm.ping", bind=True)
def ping(self) -> dict:
    """Which model version this worker serves (and a cheap round trip through the pool)."""
    return {"version": served_model().version, "pid": os.getpid(), "hostname": self.request.hostname}


@round_app.task(name="stllm.finetune", bind=True, max_retries=1)
def finetune(self, snapshot: dict, settings: dict, store_root: str | None = None) -> dict:
    """Run a fine-tune round on the ``finetune`` queue; progress as PROGRESS states (stage, step, loss).
    ``snapshot`` is a frozen snapshot, or ``{"labelstudio": pulled}`` (corrections pulled from a Label
    Studio project, frozen here where the videos can be probed). Redelivered after a lost worker, it
    resumes from the round's last checkpoint."""
    from dataclasses import asdict

    from workers.corrections import Snapshot, snapshot_from_labelstudio
    from workers.rounds import RoundSettings, run_round

    def report(stage: str, info: dict) -> None:
        if self.request.id:
            self.update_state(state="PROGRESS", meta={"stage": stage, **info})
        else:
            log.info("round %s: %s", stage, info)

    pulled = snapshot.get("labelstudio")
    if pulled and pulled.get("url") and pulled.get("api_key"):  # uploads are fetched with Label Studio's key
        from workers.media import register_key

        register_key(pulled["url"], pulled["api_key"])
    snap = (
        snapshot_from_labelstudio(pulled) if "labelstudio" in snapshot else Snapshot.model_validate(snapshot)
    )
    log.info("round on snapshot %s: %d videos from %s", snap.id, len(snap.videos), snap.sources)
    result = run_round(ModelStore(store_root), snap, RoundSettings.from_dict(settings), report)
    return asdict(result)
