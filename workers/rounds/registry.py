"""The model store: every version a round made, which one is served, and the snapshots rounds trained on.

    <store>/registry.json       {"base": ref, "serving": name, "versions": {name: {...}}}
    <store>/versions/<name>/    a saved model directory (base, round-1, round-2, ...)
    <store>/snapshots/<id>.json frozen corrections a round trained on
    <store>/round.lock          flock-ed while a round runs (one round at a time); names the holder

Updates are atomic (write a temporary file, rename it over the old one) and serialised by a file lock, so
readers always see a whole registry and a failed round never changes what is served. Imports no torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from workers.settings import current

DEFAULT_STORE = Path.home() / ".stllm" / "models"


class RoundRunning(RuntimeError):
    """A round is already running for this model store."""


class RegistryError(ValueError):
    """A registry operation that cannot be done (unknown version, no store, ...)."""


def default_store() -> Path:
    """STLLM_MODEL_STORE, else ~/.stllm/models."""
    return current().model_store or DEFAULT_STORE


class ModelStore:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_store()
        self.registry_path = self.root / "registry.json"

    # ------------------------------------------------------------------ reading
    def exists(self) -> bool:
        return self.registry_path.is_file()

    def read(self) -> dict[str, Any]:
        if not self.exists():
            raise RegistryError(f"no model store at {self.root}: create one with 'stllm round init' first")
        return json.loads(self.registry_path.read_text())

    def serving(self) -> tuple[str, Path]:
        """(name, model directory) of the version workers serve now."""
        reg = self.read()
        name = reg["serving"]
        return name, self.root / reg["versions"][name]["path"]

    def version_dir(self, name: str) -> Path:
        reg = self.read()
        if name not in reg["versions"]:
            raise RegistryError(f"unknown version {name!r}; known: {sorted(reg['versions'])}")
        return self.root / reg["versions"][name]["path"]

    def next_round(self) -> str:
        reg = self.read()
        numbers = [int(n.split("-")[1]) for n in reg["versions"] if n.startswith("round-")]
        return f"round-{max(numbers, default=0) + 1}"

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write of the registry under an exclusive lock, written atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "registry.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            reg = json.loads(self.registry_path.read_text()) if self.exists() else None
            box = {"reg": reg}
            yield box
            tmp = self.registry_path.with_name(f"registry.json.tmp{os.getpid()}")
            tmp.write_text(json.dumps(box["reg"], indent=2))
            os.replace(tmp, self.registry_path)

    def init(self, base_ref: str, base_dir: Path) -> None:
        """Create the registry with its base version (already saved at ``base_dir`` under the store)."""
        with self._locked() as box:
            if box["reg"] is not None:
                raise RegistryError(
                    f"model store {self.root} already exists (serving {box['reg']['serving']})"
                )
            box["reg"] = {
                "base": base_ref,
                "serving": "base",
                "versions": {
                    "base": {
                        "path": str(base_dir.relative_to(self.root)),
                        "parent": None,
                        "base_model": base_ref,
                        "created": time.time(),
                        "promoted": True,
                        "metrics": {},
                    }
                },
                "history": [{"serving": "base", "at": time.time(), "why": "init"}],
            }

    def add_version(self, name: str, info: dict[str, Any], promote: bool) -> None:
        with self._locked() as box:
            reg = box["reg"]
            if name in reg["versions"]:
                raise RegistryError(f"version {name} already exists")
            reg["versions"][name] = {**info, "created": time.time(), "promoted": promote}
            if promote:
                reg["serving"] = name
                reg["history"].append({"serving": name, "at": time.time(), "why": "promoted by its round"})

    def set_serving(self, name: str, why: str) -> None:
        """Serve ``name`` from now on (promote a candidate, or roll back to an earlier version)."""
        with self._locked() as box:
            reg = box["reg"]
            if reg is None:
                raise RegistryError(f"no model store at {self.root}")
            if name not in reg["versions"]:
                raise RegistryError(f"unknown version {name!r}; known: {sorted(reg['versions'])}")
            reg["serving"] = name
            reg["versions"][name]["promoted"] = True
            reg["history"].append({"serving": name, "at": time.time(), "why": why})

    # ------------------------------------------------------------------ one round at a time
    @contextlib.contextmanager
    def round_lock(self, name: str) -> Iterator[None]:
        """Hold the store's round lock while ``name`` runs; a second round gets :class:`RoundRunning`.

        The lock is ``flock`` on a descriptor this process holds open: the kernel releases it when the
        process ends however it ends (a kill, an OOM kill), so there is no stale lock to take over, and two
        processes can never both hold it. The file names the holder, for the message."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "round.lock"
        record = {"round": name, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        f = open(path, "a+")
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                try:
                    held = json.loads(f.read() or "{}")
                except ValueError:
                    held = {}
                since = time.strftime("%H:%M:%S", time.localtime(held.get("since", 0)))
                raise RoundRunning(
                    f"{held.get('round', 'a round')} is running (since {since}, pid {held.get('pid', '?')} on "
                    f"{held.get('host', '?')}); wait for it"
                ) from None
            f.seek(0)
            f.truncate()
            f.write(json.dumps(record))
            f.flush()
            try:
                yield
            finally:
                f.seek(0)
                f.truncate()  # not held: the next holder writes its own record
        finally:
            f.close()  # releases the lock
