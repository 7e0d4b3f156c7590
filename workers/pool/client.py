"""Submit and track jobs: the only part of the workers the front ends use. Imports neither torch nor the
engine.

With ``STLLM_BROKER_URL`` set, a job is split into tasks of ``chunk_size`` videos and sent to the pool;
``submit_*`` returns its id at once. Without a broker the same tasks run here, in this process, before
``submit_*`` returns (the embedded default: no servers).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from workers.pool.app import app, broker_url, round_app
from workers.pool.shared import SHARED_KEY, split_sink
from workers.schemas import AskSettings, PrelabelSettings, RoundRequest, SinkSpec, parse_labels
from workers.settings import current

_JOB_KEY = "stllm:job:{}"
_local_jobs: dict[str, dict] = {}  # embedded mode: job id -> finished summary
_local_rounds: dict[str, tuple[str, dict]] = {}  # embedded mode: round id -> (state, result or error)


@dataclass
class JobStatus:
    job_id: str
    kind: str
    state: str  # PENDING, RUNNING, SUCCESS (all tasks ended), CANCELLED
    total: int
    done: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.state in ("SUCCESS", "CANCELLED")


def _redis():
    return app.backend.client


SECRET_FIELDS = ("api_key", "access_token", "password")


def _redact(value: object) -> object:
    if isinstance(value, dict):
        return {k: "***" if k in SECRET_FIELDS and v else _redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v) for v in value]
    return value


def redacted_repr(args: tuple) -> str:
    """The task arguments as task events show them (Flower, ``celery events``): secrets replaced by ``***``
    and long arguments cut, so neither a key nor a whole job's sink is copied into every event."""
    text = repr(_redact(list(args)))
    return text if len(text) <= 2000 else text[:2000] + "...]"


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _submit(kind: str, videos: list[str], args: tuple, sink: SinkSpec | None, chunk_size: int) -> str:
    sink = sink.model_dump() if sink is not None else None
    if not videos:
        raise ValueError("no videos given")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    from workers.pool import tasks

    task = {"prelabel": tasks.prelabel, "ask": tasks.ask}[kind]
    job_id = uuid.uuid4().hex
    chunks = _chunks(list(videos), chunk_size)
    if broker_url() is None:
        summaries = [task.run(job_id, chunk, *args, sink) for chunk in chunks]
        _local_jobs[job_id] = {"kind": kind, "total": len(videos), "summaries": summaries}
        return job_id
    # What every task shares (labels, settings, the sink without its per-video mapping) is stored once per
    # job; each task carries only its videos and their part of the mapping: messages stay the same size
    # however large the job.
    common, field = split_sink(sink)
    _redis().set(
        SHARED_KEY.format(job_id),
        json.dumps({"args": list(args), "sink": common}),
        ex=app.conf.result_expires,
    )
    ids = []
    for chunk in chunks:
        mapping = {v: sink[field][v] for v in chunk if v in sink[field]} if field else None
        kwargs = {"shared": True, "mapping": mapping}
        ids.append(
            task.apply_async(
                (job_id, chunk),
                kwargs,
                argsrepr=redacted_repr((job_id, chunk)),
                kwargsrepr=repr(kwargs)[:2000],
            ).id
        )
    meta = {
        "kind": kind,
        "total": len(videos),
        "tasks": ids,
        "chunks": [len(c) for c in chunks],
        "created": time.time(),
    }
    _redis().set(_JOB_KEY.format(job_id), json.dumps(meta), ex=app.conf.result_expires)
    return job_id


def submit_prelabel(
    videos: list[str],
    labels: list[str] | list[dict],
    settings: PrelabelSettings | None = None,
    sink: SinkSpec | None = None,
    chunk_size: int = 4,
) -> str:
    """Pre-label ``videos`` with an event vocabulary; returns the job id. ``sink`` says where workers
    write results (e.g. ``JsonlSinkSpec(path=...)``); results are also kept with the job."""
    vocab = [label.model_dump() for label in parse_labels(labels)]
    s = (settings or PrelabelSettings()).model_dump()
    return _submit("prelabel", videos, (vocab, s), sink, chunk_size)


def submit_ask(
    videos: list[str],
    question: str,
    settings: AskSettings | None = None,
    sink: SinkSpec | None = None,
    chunk_size: int = 4,
) -> str:
    """Ask ``question`` over ``videos``; returns the job id."""
    if not question or not question.strip():
        raise ValueError("the question is empty")
    return _submit("ask", videos, (question, (settings or AskSettings()).model_dump()), sink, chunk_size)


def _meta(job_id: str) -> dict:
    if job_id in _local_jobs:
        return _local_jobs[job_id]
    raw = _redis().get(_JOB_KEY.format(job_id)) if broker_url() else None
    if raw is None:
        raise KeyError(f"no job {job_id!r} (unknown id, or expired)")
    return json.loads(raw)


def status(job_id: str) -> JobStatus:
    """Progress of a job: videos done / failed / total, and the errors so far."""
    meta = _meta(job_id)
    st = JobStatus(job_id, meta["kind"], "PENDING", meta["total"])
    if "summaries" in meta:
        summaries = meta["summaries"]
    else:
        summaries = []
        started = ended = 0
        for tid in meta["tasks"]:
            r = app.AsyncResult(tid)
            state, info = r.state, r.info
            if state == "PROGRESS" and isinstance(info, dict):
                st.done += info.get("done", 0)
                st.failed += info.get("failed", 0)
                started += 1
            elif state == "SUCCESS":
                summaries.append(info)
                ended += 1
            elif state in ("FAILURE", "REVOKED"):
                ended += 1
                st.errors.append(f"task {tid}: {state} {info!r}")
            elif state == "STARTED":
                started += 1
        cancelled = bool(_redis().get(f"stllm:cancel:{job_id}"))
        if ended == len(meta["tasks"]):
            st.state = "CANCELLED" if cancelled else "SUCCESS"
        elif cancelled and not started:
            st.state = "CANCELLED"
        else:
            st.state = "RUNNING" if started or ended else "PENDING"
    for s in summaries:
        st.done += s["done"]
        st.failed += s["failed"]
        st.errors += [r["error"] for r in s["results"] if r["error"]]
    if "summaries" in meta:
        st.state = "SUCCESS"
    return st


def results(job_id: str) -> list[dict]:
    """The results of a job's finished tasks, one per processed video."""
    meta = _meta(job_id)
    if "summaries" in meta:
        return [r for s in meta["summaries"] for r in s["results"]]
    out = []
    for tid in meta["tasks"]:
        r = app.AsyncResult(tid)
        if r.state == "SUCCESS":
            out += r.result["results"]
    return out


def wait(
    job_id: str,
    timeout: float | None = None,
    poll: float = 0.5,
    on_progress: Callable[[JobStatus], None] | None = None,
) -> JobStatus:
    """Block until every task of the job has ended (or ``timeout`` seconds); returns the last status."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        st = status(job_id)
        if on_progress:
            on_progress(st)
        if st.finished:
            return st
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(
                f"job {job_id} not finished after {timeout}s: {st.done + st.failed}/{st.total} videos"
            )
        time.sleep(poll)


def cancel(job_id: str) -> None:
    """Stop a job: queued tasks are revoked, running ones stop before their next video."""
    meta = _meta(job_id)
    if "summaries" in meta:
        return
    _redis().set(f"stllm:cancel:{job_id}", 1, ex=app.conf.result_expires)
    app.control.revoke(meta["tasks"])


def submit_round(request: RoundRequest, progress: Callable[[str, dict], None] | None = None) -> str:
    """Start a fine-tune round on the pool's ``finetune`` queue; returns the task id to follow with
    :func:`round_status` or :func:`follow_round`. With no broker configured the round runs here, before this
    returns (the embedded default), calling ``progress(stage, info)`` as it goes."""
    if broker_url() is None:
        from workers.rounds.run import run_round_request

        round_id = f"local-{uuid.uuid4().hex}"
        try:
            _local_rounds[round_id] = ("SUCCESS", run_round_request(request, progress))
        except Exception as e:  # a failed round leaves the store as it was; say why
            _local_rounds[round_id] = ("FAILURE", {"error": f"{e.__class__.__name__}: {e}"})
        return round_id
    from workers.pool import tasks

    payload = (request.model_dump(mode="json"),)
    return tasks.finetune.apply_async(payload, argsrepr=redacted_repr(payload), kwargsrepr="{}").id


def round_status(task_id: str) -> tuple[str, dict]:
    """(state, info) of a round submitted with :func:`submit_round`: PROGRESS info has stage and step;
    SUCCESS info is the round's result (version, promoted, metrics); FAILURE info is the error."""
    if task_id in _local_rounds:
        return _local_rounds[task_id]
    r = round_app.AsyncResult(task_id)
    info = r.info
    if isinstance(info, Exception):
        info = {"error": f"{info.__class__.__name__}: {info}"}
    return r.state, info or {}


def follow_round(
    task_id: str, progress: Callable[[str, dict], None] | None = None, every_s: float = 1.0
) -> tuple[str, dict]:
    """Wait for a round to end, calling ``progress(stage, info)`` on each PROGRESS state seen (stage is
    'collect', 'features', 'train' with step and loss, 'gate'); returns the final (state, info)."""
    while True:
        state, info = round_status(task_id)
        if state == "PROGRESS" and progress:
            progress(info.get("stage", "?"), info)
        if state in ("SUCCESS", "FAILURE"):
            return state, info
        time.sleep(every_s)


def served_version() -> str:
    """The version the workers serve: the model store's serving version, else '<STLLM_MODEL>@base' (or the
    version a saved model directory names)."""
    from workers.rounds.registry import ModelStore

    settings = current()
    if settings.model_store:
        store = ModelStore(settings.model_store)
        if store.exists():
            return store.serving()[0]
    meta = Path(settings.model) / "stllm.json"  # a saved model directory names its own version
    return json.loads(meta.read_text()).get("version", "base") if meta.is_file() else f"{settings.model}@base"
