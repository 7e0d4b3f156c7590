"""Small helpers shared by tests that start servers."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from workers.pool.processes import free_port  # noqa: F401
from workers.pool.processes import wait_for_health as get_health  # noqa: F401


def broker_port() -> int:
    """The port of the test session's broker (conftest.py sets STLLM_BROKER_URL)."""
    return int(os.environ["STLLM_BROKER_URL"].rsplit(":", 1)[1].split("/")[0])


class Redis:
    """A private redis-server on a free loopback port, persisting to its own folder (AOF) so that a
    restart keeps the queued tasks."""

    def __init__(self, folder: Path, port: int | None = None):
        self.folder, self.port = folder, port or broker_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
        )
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Worker:
    """The processes `stllm worker` starts for these queues (a prediction worker, and a rounds worker when
    'finetune' is among them), logging into one file."""

    def __init__(
        self,
        name: str,
        model_dir: str,
        log: Path,
        extra_env: dict | None = None,
        queues: str = "ask,prelabel",
    ):
        from workers.pool.processes import worker_commands

        env = {**os.environ, "STLLM_MODEL": model_dir, "STLLM_DTYPE": "fp32", **(extra_env or {})}
        self.log = log
        self.name = name
        out = open(log, "w")
        self.procs = [
            subprocess.Popen(
                cmd + ["--without-gossip", "--without-mingle"],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**env, **cmd_env},
            )
            for cmd, cmd_env in worker_commands([], queues, name=name)
        ]
        self.serves_predictions = queues != "finetune"

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text()
            if text.count("ready.") >= len(self.procs) and ("serves" in text or not self.serves_predictions):
                return
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"worker died:\n{text}")
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready:\n{self.log.read_text()}")

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


def video_with_a_silent_last_packet(path, frames: int = 50, fps: int = 24):
    """An H.264 MP4 whose container holds one packet more than decodes (junk after the last frame)."""
    import av
    import numpy as np

    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.options = {"g": "12", "bf": "0"}
        stamps = []
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 4, np.uint8), format="rgb24")
            for p in s.encode(frame):
                stamps.append((p.pts, p.dts, p.time_base))
                out.mux(p)
        for p in s.encode():
            stamps.append((p.pts, p.dts, p.time_base))
            out.mux(p)
        junk = av.Packet(b"\x00\x00\x00\x01\x09" + b"\xff" * 50)
        junk.stream, junk.time_base = s, stamps[-1][2]
        junk.pts, junk.dts = max(x[0] for x in stamps) + 1, max(x[1] for x in stamps) + 1
        out.mux(junk)
    return path


class StubServer:
    """A loopback HTTP server whose handler is a function of the request; it records what it was sent."""

    def __init__(self, respond):
        self.seen: list[dict] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.seen.append({"path": self.path, "auth": self.headers.get("Authorization")})
                respond(self)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
