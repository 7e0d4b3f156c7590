"""Where tasks write their results. Every sink is idempotent: writing the same video and model version
again replaces the earlier result, so a redelivered task never doubles a result."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path


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


def sink_from(description: dict | None):
    """Rebuild a sink from its JSON description (what a job carries to the workers)."""
    if not description:
        return None
    kind = description.get("kind")
    if kind == "jsonl":
        return JsonlSink(description["path"])
    raise ValueError(f"unknown sink kind {kind!r}")
