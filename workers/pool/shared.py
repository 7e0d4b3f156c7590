"""What every task of a job shares (labels or the question, settings, the sink without its per-video
mapping), stored once per job in Redis beside the job, and a task's view of it. Used by the client (which
writes it) and the tasks (which read it)."""

from __future__ import annotations

import json

from workers.pool.app import app

SHARED_KEY = "stllm:job:{}:shared"
MAPPING_FIELDS = ("ids", "tasks")  # a sink's per-video mapping (FiftyOne sample ids, Label Studio task ids)


def split_sink(sink: dict | None) -> tuple[dict | None, str | None]:
    """(the sink without its per-video mapping, the mapping's field name or None)."""
    if sink is None:
        return None, None
    field = next((f for f in MAPPING_FIELDS if isinstance(sink.get(f), dict)), None)
    return ({**sink, field: {}} if field else sink), field


def shared_part(job_id: str, mapping: dict | None) -> tuple[list, dict | None]:
    """A task's view of its job: the shared arguments and its sink with its own part of the mapping.
    Raises RuntimeError when the job's shared part is gone (expired with the job)."""
    raw = app.backend.client.get(SHARED_KEY.format(job_id))
    if raw is None:
        raise RuntimeError(f"job {job_id}: its shared settings are gone (the job expired)")
    shared = json.loads(raw)
    sink, field = split_sink(shared["sink"])
    if field and mapping is not None:
        sink = {**sink, field: mapping}
    return shared["args"], sink
