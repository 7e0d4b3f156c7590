"""Celery tasks: thin wrappers over the jobs in ``workers.jobs`` and the rounds in ``workers.rounds``. The model is loaded once per worker
process (``worker_process_init``), never per task. Each task handles a few videos of a job, reports
progress, writes its results through the job's sink and skips its remaining videos once the job is
cancelled."""

from __future__ import annotations

import logging
import os

from celery.signals import worker_process_init

from workers.pool.app import app, broker_url, round_app
from workers.rounds.registry import ModelStore
from workers.schemas import AskSettings, PrelabelSettings, RoundRequest, parse_labels
from workers.settings import current
from workers.sinks import parse_sink, sink_from

log = logging.getLogger("stllm.worker")
_model = None
_model_key: str | None = None


def _wanted_model() -> str:
    """The model directory this worker should serve now: the model store's serving version when
    STLLM_MODEL_STORE points at a store, else STLLM_MODEL (default builtin)."""
    settings = current()
    if settings.model_store:
        store = ModelStore(settings.model_store)
        if store.exists():
            return str(store.serving()[1])
    return settings.model


def served_model():
    """The model this process serves. Loaded at process start in a worker; reloaded before a task when the
    model store has promoted (or rolled back to) another version since."""
    global _model, _model_key
    wanted = _wanted_model()
    if _model is None or wanted != _model_key:
        from workers.stllm.cpu import CpuServing
        from workers.stllm.io import load_model

        s = current()
        previous = _model.version if _model is not None else None
        cpu = CpuServing(fused_linear=s.cpu.fused_linear, exact_gelu=s.cpu.exact_gelu, kernels=s.cpu.kernels)
        _model = load_model(wanted, device=s.device, dtype=s.dtype, cache_dir=s.cache_dir).inference_weights(
            cpu
        )
        _model_key = wanted
        if previous:
            log.info("worker pid %d switched from %s to %s", os.getpid(), previous, _model.version)
        else:
            log.info("worker pid %d serves %s (version %s)", os.getpid(), wanted, _model.version)
    return _model


@worker_process_init.connect
def _load_model_at_start(**_) -> None:
    """A worker process's start: the process-wide CPU tuning, then the served model."""
    from workers.stllm.cpu import tune_process

    s = current()
    tune_process(keep_freed_memory=s.cpu.keep_freed_memory, kernels=s.cpu.kernels)
    if s.worker_role != "rounds":  # a rounds worker loads what each round needs
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
    spec = parse_sink(sink)
    out = sink_from(spec)
    if getattr(spec, "url", None) and getattr(spec, "api_key", None):  # Label Studio media, with its key
        from workers.media import register_key

        register_key(spec.url, spec.api_key)

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

    model = served_model()
    vocab, s = parse_labels(labels), PrelabelSettings(**settings)
    return _run(self, job_id, videos, sink, lambda v, progress: prelabel_videos(model, v, vocab, s, progress))


@app.task(name="stllm.ask", bind=True, max_retries=2)
def ask(self, job_id: str, videos: list[str], question: str, settings: dict, sink: dict | None = None):
    from workers.jobs import ask_videos

    model = served_model()
    s = AskSettings(**settings)
    return _run(self, job_id, videos, sink, lambda v, progress: ask_videos(model, v, question, s, progress))


@app.task(name="stllm.ping", bind=True)
def ping(self) -> dict:
    """Which model version this worker serves (and a cheap round trip through the pool)."""
    return {"version": served_model().version, "pid": os.getpid(), "hostname": self.request.hostname}


@round_app.task(name="stllm.finetune", bind=True, max_retries=1)
def finetune(self, request: dict) -> dict:
    """Run a fine-tune round (a :class:`workers.schemas.RoundRequest`) on the ``finetune`` queue; progress as
    PROGRESS states (stage, step, loss). Redelivered after a lost worker, it resumes from the round's last
    checkpoint."""
    from workers.rounds.run import run_round_request

    def report(stage: str, info: dict) -> None:
        if self.request.id:
            self.update_state(state="PROGRESS", meta={"stage": stage, **info})
        else:
            log.info("round %s: %s", stage, info)

    return run_round_request(RoundRequest.model_validate(request), report)
