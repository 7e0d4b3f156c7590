"""The backend's round bookkeeping in SQLite (WAL mode): which corrections count toward the next automatic
round, and which rounds were requested, submitted or skipped. One file under the backend's state, shared by
every gunicorn process on the machine; each decision that must not be taken twice (starting a round) is one
``BEGIN IMMEDIATE`` transaction, so two processes cannot both take it. Every query is by indexed key: the
cost of a webhook does not grow with the project's history.

A correction is an (annotation, update time) pair: the same pair delivered again does not count again, a
newer update of an annotation counts again, a deletion takes back a correction not yet used by a round.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

from workers.sinks.files import connect_wal

SCHEMA = """
CREATE TABLE IF NOT EXISTS corrections (
    project INTEGER NOT NULL, annotation TEXT NOT NULL, stamp TEXT NOT NULL,
    pending INTEGER NOT NULL, deleted INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (project, annotation));
CREATE INDEX IF NOT EXISTS pending_by_project ON corrections (project, pending);
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT, project INTEGER NOT NULL, reason TEXT NOT NULL,
    status TEXT NOT NULL, at REAL NOT NULL, updated REAL NOT NULL,
    round TEXT, digest TEXT, error TEXT);
CREATE INDEX IF NOT EXISTS requests_by_project ON requests (project, status, updated);
"""
OPEN = ("requested", "submitting")


class RoundLedger:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.executescript(SCHEMA)

    @contextmanager
    def _db(self, immediate: bool = False):
        db = connect_wal(self.path)
        try:
            db.execute("PRAGMA synchronous=FULL")  # a counted correction survives a power cut
            if immediate:
                db.execute("BEGIN IMMEDIATE")
            yield db
            if immediate:
                db.execute("COMMIT")
        except BaseException:
            if immediate and db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    # ------------------------------------------------------------------ corrections
    def record(self, project: int, annotation: int | str, stamp: str, deleted: bool) -> None:
        """Note one webhook's annotation event (see the module docstring for what counts)."""
        key = str(annotation)
        with self._db(immediate=True) as db:
            row = db.execute(
                "SELECT stamp, pending, deleted FROM corrections WHERE project=? AND annotation=?",
                (project, key),
            ).fetchone()
            if deleted:
                if row is not None:
                    db.execute(
                        "UPDATE corrections SET pending=0, deleted=1 WHERE project=? AND annotation=?",
                        (project, key),
                    )
                return
            if row is not None and (
                row[0] == stamp or row[2]
            ):  # a redelivery, or an event after its deletion
                return
            db.execute(
                "INSERT INTO corrections (project, annotation, stamp, pending) VALUES (?, ?, ?, 1) "
                "ON CONFLICT (project, annotation) DO UPDATE SET stamp=excluded.stamp, pending=1",
                (project, key, stamp),
            )

    def pending(self, project: int) -> int:
        """Distinct corrections of ``project`` since its last round was requested."""
        with self._db() as db:
            return db.execute(
                "SELECT COUNT(*) FROM corrections WHERE project=? AND pending=1", (project,)
            ).fetchone()[0]

    # ------------------------------------------------------------------ rounds
    def request(
        self, project: int, reason: str, threshold: int | None = None, coalesce_s: float = 60.0
    ) -> int | None:
        """Request a round for ``project``; returns its id, or None when none is due: fewer than
        ``threshold`` pending corrections (None: no threshold, an explicit request), or a request already
        open or submitted less than ``coalesce_s`` ago (twenty presses of "start training" make one round)."""
        now = time.time()
        with self._db(immediate=True) as db:
            if threshold is not None:
                n = db.execute(
                    "SELECT COUNT(*) FROM corrections WHERE project=? AND pending=1", (project,)
                ).fetchone()[0]
                if n < threshold:
                    return None
            busy = db.execute(
                "SELECT 1 FROM requests WHERE project=? AND (status IN (?, ?) OR "
                "(status='submitted' AND updated > ?)) LIMIT 1",
                (project, *OPEN, now - coalesce_s),
            ).fetchone()
            if busy:
                return None
            cur = db.execute(
                "INSERT INTO requests (project, reason, status, at, updated) VALUES (?, ?, 'requested', ?, ?)",
                (project, reason, now, now),
            )
            db.execute("UPDATE corrections SET pending=0 WHERE project=? AND pending=1", (project,))
            return int(cur.lastrowid)

    def claim(self, request_id: int, stale_s: float = 600.0) -> bool:
        """Take a request to submit it: True for the one process that gets it (a claim older than
        ``stale_s`` whose process died may be taken again)."""
        now = time.time()
        with self._db(immediate=True) as db:
            cur = db.execute(
                "UPDATE requests SET status='submitting', updated=? WHERE id=? AND "
                "(status='requested' OR (status='submitting' AND updated < ?))",
                (now, request_id, now - stale_s),
            )
            return cur.rowcount == 1

    def finish(
        self,
        request_id: int,
        status: str,
        round_id: str | None = None,
        digest: str | None = None,
        error: str | None = None,
    ) -> None:
        """Close a request: ``submitted`` (with its round and snapshot digest), ``skipped`` or ``failed``."""
        with self._db() as db:
            db.execute(
                "UPDATE requests SET status=?, updated=?, round=?, digest=?, error=? WHERE id=?",
                (status, time.time(), round_id, digest, error, request_id),
            )

    def last_digest(self, project: int) -> str | None:
        """The snapshot digest of the project's last submitted round."""
        with self._db() as db:
            row = db.execute(
                "SELECT digest FROM requests WHERE project=? AND status='submitted' ORDER BY id DESC LIMIT 1",
                (project,),
            ).fetchone()
            return row[0] if row else None

    def open_requests(self) -> list[tuple[int, int, str]]:
        """(id, project, reason) of requests not yet submitted: after a restart they are submitted."""
        with self._db() as db:
            return db.execute(
                "SELECT id, project, reason FROM requests WHERE status IN (?, ?) ORDER BY id", OPEN
            ).fetchall()

    def requests(self, project: int) -> list[dict]:
        """Every request of a project, oldest first (for status and tests)."""
        with self._db() as db:
            db.row_factory = sqlite3.Row
            rows = db.execute("SELECT * FROM requests WHERE project=? ORDER BY id", (project,)).fetchall()
            return [dict(r) for r in rows]
