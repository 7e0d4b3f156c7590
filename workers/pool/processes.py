"""Starting the pool: ``stllm worker`` (one worker process per GPU) and ``stllm up`` (a private Redis plus
the workers on one machine). Children are stopped cleanly on Ctrl-C or SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def worker_commands(gpus: list[str], queues: str, name: str = "stllm") -> list[tuple[list[str], dict]]:
    """One ``celery worker`` per GPU (each sees only its GPU), or one on CPU when ``gpus`` is empty, for the
    prediction queues; prefork with a single child started by spawn: the model loads in the child at
    start, CUDA never crosses a fork. With ``finetune`` among the queues, one more worker serves rounds
    (on the first GPU), from their own broker database."""
    wanted = [q for q in queues.split(",") if q]
    predict = [q for q in wanted if q != "finetune"]

    def command(app: str, qs: list[str], node: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "celery",
            "-A",
            app,
            "worker",
            "-P",
            "prefork",
            "-c",
            "1",
            "--pool-start-method=spawn",
            "-Q",
            ",".join(qs),
            "-n",
            node,
            "-l",
            "INFO",
        ]

    out = []
    if predict:
        if not gpus:
            out.append((command("workers.pool.app", predict, f"{name}-cpu@%h"), {"CUDA_VISIBLE_DEVICES": ""}))
        for g in gpus:
            out.append(
                (command("workers.pool.app", predict, f"{name}-gpu{g}@%h"), {"CUDA_VISIBLE_DEVICES": g})
            )
    if "finetune" in wanted:
        env = {"CUDA_VISIBLE_DEVICES": gpus[0] if gpus else "", "STLLM_WORKER_ROLE": "rounds"}
        out.append((command("workers.pool.app:round_app", ["finetune"], f"{name}-rounds@%h"), env))
    return out


def detect_gpus() -> list[str]:
    """GPU indices visible to this machine, without importing torch in this process."""
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True
    )
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(folder: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """A private redis-server on loopback persisting to ``folder`` (AOF); returns (process, URL)."""
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
    port = port or free_port()
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--appendonly",
            "yes",
            "--save",
            "",
            "--dir",
            str(folder),
        ],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    proc.terminate()
    raise RuntimeError("redis-server did not start")


def run_children(children: list[subprocess.Popen]) -> int:
    """Wait for the children; on Ctrl-C/SIGTERM stop them all (warm shutdown: running tasks finish or,
    with late acks, go back to the queue) and return 0. If a child ends by itself, stop the others and
    return its exit status (1 for a child that ended with 0: a service does not end by itself). Ctrl-C in a
    terminal reaches the children too, and one may end before this process has seen the signal: that is
    still a stop, not a failure."""
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    died = None
    while not stopping and died is None:
        died = next((c for c in children if c.poll() is not None), None)
        time.sleep(0.5)
    for c in children:
        if c.poll() is None:
            c.send_signal(signal.SIGTERM)
    for c in children:
        try:
            c.wait(60)
        except subprocess.TimeoutExpired:
            c.kill()
    if stopping:
        return 0
    return (died.returncode or 1) if died is not None else 0


def start_workers(gpus: list[str], queues: str) -> list[subprocess.Popen]:
    return [subprocess.Popen(cmd, env={**os.environ, **env}) for cmd, env in worker_commands(gpus, queues)]


def wait_for_health(port: int, timeout_s: float, why: str = "") -> dict:
    """GET http://127.0.0.1:<port>/health until it answers (TimeoutError after ``timeout_s``); its JSON."""
    import json
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                return json.load(r)
        except OSError as e:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing answered on port {port}\n{why}") from e
            time.sleep(0.3)
