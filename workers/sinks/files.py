"""JSON-lines files: a replace-by-key file for results, and an append-only log."""

from __future__ import annotations

import fcntl
import json
import logging
import operator
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def _key(record: dict) -> tuple[str, str]:
    return record["video"], record["model_version"]


class JsonlSink:
    """A JSON-lines file, one object per (video, model version). Safe for several worker processes on one
    machine or a shared file system with working locks: each write takes an exclusive lock, drops a line
    with the same key, appends, and renames a complete new file into place."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

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
    the last record per ``key`` (default: a record's ``"id"``), so a repeated event counts once."""

    def __init__(self, path: str | os.PathLike, key: Callable[[dict], object] = operator.itemgetter("id")):
        self.path = Path(path)
        self.key = key

    def write(self, records: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = "".join(json.dumps(r) + "\n" for r in records)
        with open(self.path, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # one writer at a time: lines never interleave
            end = f.seek(0, os.SEEK_END)
            if end:
                f.seek(end - 1)
                if f.read(1) != b"\n":  # the last line was torn (a crash, a full disk): end it first
                    body = "\n" + body
            f.write(body.encode())
            f.flush()
            os.fsync(f.fileno())  # acknowledged means on disk: these are humans' corrections

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        latest: dict[object, dict] = {}
        with open(self.path) as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        r = json.loads(line)
                        k = self.key(r)
                    except (ValueError, KeyError, TypeError) as e:  # a line torn by a crash or a full disk
                        log.warning("%s line %d skipped (not a whole record): %s", self.path, number, e)
                        continue
                    latest.pop(k, None)
                    latest[k] = r
        return list(latest.values())


def connect_wal(path: str | os.PathLike, timeout: float = 30.0) -> sqlite3.Connection:
    """A connection (autocommit; BEGIN yourself) to the SQLite file ``path`` in WAL mode, safe to call from
    several processes at once. Switching a new file to WAL takes a lock that SQLite does not wait for: two
    processes starting together (gunicorn's workers) can get "database is locked" at once, so the switch is
    retried until ``timeout``. Once the file is in WAL mode it stays so and the call is only a read."""
    db = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    deadline = time.monotonic() + timeout
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return db
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                db.close()
                raise
            time.sleep(0.05)


class SqliteStore:
    """Records keyed by (video, model version) in SQLite (WAL mode): the same interface as
    :class:`JsonlSink`, but a write touches its own rows and a lookup reads only the keys asked for, so
    neither grows with what is stored (the Label Studio prediction cache holds a whole project's history).
    Safe for several processes on one machine."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def _db(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = connect_wal(self.path)
        db.execute(
            "CREATE TABLE IF NOT EXISTS records (video TEXT NOT NULL, model_version TEXT NOT NULL, "
            "record TEXT NOT NULL, PRIMARY KEY (video, model_version))"
        )
        return db

    def write(self, records: list[dict]) -> None:
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT OR REPLACE INTO records VALUES (?, ?, ?)",
                [(r["video"], r["model_version"], json.dumps(r)) for r in records],
            )
            db.execute("COMMIT")
        finally:
            db.close()

    def get(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], dict]:
        """The stored records of these (video, model version) keys (absent keys are left out)."""
        if not keys:
            return {}
        db = self._db()
        try:
            out = {}
            by_version: dict[str, list[str]] = {}
            for video, version in keys:
                by_version.setdefault(version, []).append(video)
            for version, videos in by_version.items():
                for i in range(0, len(videos), 500):  # within SQLite's bound on a statement's parameters
                    part = videos[i : i + 500]
                    rows = db.execute(  # the primary key's index: cost by the keys asked, not the rows stored
                        "SELECT record FROM records WHERE model_version = ? AND video IN ("
                        + ",".join("?" * len(part))
                        + ")",
                        [version, *part],
                    ).fetchall()
                    for (raw,) in rows:
                        r = json.loads(raw)
                        out[_key(r)] = r
            return out
        finally:
            db.close()

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        db = self._db()
        try:
            return [json.loads(raw) for (raw,) in db.execute("SELECT record FROM records ORDER BY rowid")]
        finally:
            db.close()
