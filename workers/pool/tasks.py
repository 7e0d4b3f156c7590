"""Celery tasks: thin wrappers over the jobs in ``workers.jobs`` and the rounds in ``workers.rounds``. The model is loaded once per worker
process (``worker_process_init``), never per task. Each task handles a few videos of a job, reports
progress, writes its results through the job's sink and skips its remaining videos once the job is
cancelled."""

from __future__ import annotations

import json
import logging
import os

from celery.signals import worker_process_init

from workers.pool.app import app, broker_url, round_app
from workers.pool.shared import shared_part
from workers.rounds.registry import ModelStore
from workers.schemas import (
    AskResult,
    AskSettings,
    PrelabelResult,
    PrelabelSettings,
    RoundRequest,
    parse_labels,
)
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


# A video during which the worker process died this many times (the OOM killer takes the prefork child) is
# not tried again: it fails with an error naming it, and the task's other videos go on.
MAX_VIDEO_ATTEMPTS = 2
# Runs of a task after its process died (task_retry_on_worker_lost, a second later: default_retry_delay): each
# death uses one of a video's starts, so a chunk of up to 32 videos always ends, every video finished or
# failed, within this many.
MAX_RETRIES = 2 * MAX_VIDEO_ATTEMPTS * 32


class _Ledger:
    """Per task, in Redis: how often each video was started and the results already made, so that a task
    run again after its worker process died skips the finished videos and stops a video that kills the
    process every time. Nothing (the embedded default) without a broker."""

    def __init__(self, task_id: str | None):
        client = getattr(app.backend, "client", None) if broker_url() and task_id else None
        self.client, self.key = client, f"stllm:task:{task_id}"

    def earlier(self) -> dict[int, dict]:
        """Results recorded by earlier runs of this task, by video index."""
        if self.client is None:
            return {}
        rows = self.client.hgetall(self.key)
        return {
            int(k[2:]): json.loads(v) for k, v in ((k.decode(), v) for k, v in rows.items()) if k[:2] == "r:"
        }

    def ran_before(self) -> bool:
        return self.client is not None and bool(self.client.exists(self.key))

    def start(self, index: int) -> int:
        """Count one more start of video ``index``; returns how many starts it has had."""
        if self.client is None:
            return 1
        n = int(self.client.hincrby(self.key, f"a:{index}", 1))
        self.client.expire(self.key, app.conf.result_expires)
        return n

    def finish(self, index: int, result: dict) -> None:
        if self.client is not None:
            self.client.hset(self.key, f"r:{index}", json.dumps(result))

    def clear(self) -> None:
        """The task finished: its results live on in the task's result, not twice."""
        if self.client is not None:
            self.client.delete(self.key)


def _run(task, job_id: str, videos: list[str], sink: dict | None, fn, failed_result) -> dict:
    """Run ``fn(videos, progress)`` (a job function from workers.jobs) over the task's videos in one call, so
    decoding the next video overlaps compute and pre-labeling batches windows across videos. Each result is
    written to the sink and reported as progress as it comes; a cancelled job stops taking videos.

    Run again after its worker process died (the task is retried on worker loss, or redelivered), it keeps
    the results already made, runs the remaining videos one at a time (so the one in flight when a process
    dies is known) and fails a video that was started ``MAX_VIDEO_ATTEMPTS`` times already with
    ``failed_result(video, reason)``."""
    spec = parse_sink(sink)
    out = sink_from(spec)
    if getattr(spec, "url", None) and getattr(spec, "api_key", None):  # Label Studio media, with its key
        from workers.media import register_key

        register_key(spec.url, spec.api_key)
    ledger = _Ledger(task.request.id if task is not None else None)
    isolated = ledger.ran_before()
    by_index: dict[int, dict] = ledger.earlier()
    where = {}  # video path -> the indexes it has in this task, in order

    def record(result, index: int | None = None) -> None:
        r = result.model_dump(mode="json") if hasattr(result, "model_dump") else result
        if index is None:
            index = where[r["video"]].pop(0)
        if out is not None:
            try:
                out.write([r])
            except Exception as e:  # one record the sink refuses does not end the chunk
                log.error("job %s: writing the result of %s failed: %s", job_id, r["video"], e)
                r = {**r, "error": f"{r.get('error') or ''} (result not written: {e})".strip()}
        by_index[index] = r
        ledger.finish(index, r)
        if task is not None and task.request.id:
            done = sum(x["error"] is None for x in by_index.values())
            task.update_state(
                state="PROGRESS", meta={"done": done, "failed": len(by_index) - done, "total": len(videos)}
            )

    def remaining(indexes):
        for i in indexes:
            if is_cancelled(job_id):
                return
            if ledger.start(i) > MAX_VIDEO_ATTEMPTS:
                reason = (
                    f"{videos[i]}: the worker process died while processing this video {MAX_VIDEO_ATTEMPTS} "
                    "times (killed, e.g. for running out of memory); not tried again"
                )
                log.error("job %s: %s: %s", job_id, videos[i], reason)
                record(failed_result(videos[i], reason), i)
                continue
            where.setdefault(videos[i], []).append(i)
            yield videos[i]

    todo = [i for i in range(len(videos)) if i not in by_index]
    if isolated:  # after a process death: one video at a time, so a video that kills the process is known
        log.info("job %s: task run again: %d of %d videos left", job_id, len(todo), len(videos))
        for i in todo:
            fn(remaining([i]), record)
    else:
        fn(remaining(todo), record)
    results = [by_index[i] for i in sorted(by_index)]
    if len(results) == len(videos):
        ledger.clear()
    if len(results) < len(videos):
        log.info("job %s cancelled: skipped %d videos", job_id, len(videos) - len(results))
    done = sum(r["error"] is None for r in results)
    return {"results": results, "done": done, "failed": len(results) - done, "total": len(videos)}


@app.task(name="stllm.prelabel", bind=True, max_retries=MAX_RETRIES, default_retry_delay=1)
def prelabel(
    self,
    job_id: str,
    videos: list[str],
    labels: list[dict] | None = None,
    settings: dict | None = None,
    sink: dict | None = None,
    shared: bool = False,
    mapping: dict | None = None,
):
    """Pre-label a chunk of a job. ``shared``: labels, settings and sink are the job's, stored once
    (``workers.pool.client.shared_part``); ``mapping`` is this chunk's part of the sink's mapping."""
    from workers.jobs import prelabel_videos

    if shared:
        (labels, settings), sink = shared_part(job_id, mapping)
    model = served_model()
    vocab, s = parse_labels(labels), PrelabelSettings(**settings)
    return _run(
        self,
        job_id,
        videos,
        sink,
        lambda v, progress: prelabel_videos(model, v, vocab, s, progress),
        lambda video, reason: PrelabelResult(video=video, model_version=model.version, error=reason),
    )


@app.task(name="stllm.ask", bind=True, max_retries=MAX_RETRIES, default_retry_delay=1)
def ask(
    self,
    job_id: str,
    videos: list[str],
    question: str | None = None,
    settings: dict | None = None,
    sink: dict | None = None,
    shared: bool = False,
    mapping: dict | None = None,
):
    """Ask a question over a chunk of a job (``shared``, ``mapping``: as :func:`prelabel`)."""
    from workers.jobs import ask_videos

    if shared:
        (question, settings), sink = shared_part(job_id, mapping)
    model = served_model()
    s = AskSettings(**settings)
    return _run(
        self,
        job_id,
        videos,
        sink,
        lambda v, progress: ask_videos(model, v, question, s, progress),
        lambda video, reason: AskResult(
            video=video, question=question, model_version=model.version, error=reason
        ),
    )


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
