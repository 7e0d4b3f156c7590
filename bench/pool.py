"""Pool figures on this machine: round-trip latency p50/p95 of a no-op task and tasks/s through Redis,
time from a worker's SIGKILL to its task completing on another worker, and pre-label throughput of one
job on 1 vs 2 CPU workers, and on 1 worker with 4 videos per task (decode prefetch and windows batched
across videos) vs one video per task.

    .venv/bin/python bench/pool.py [--model builtin] [--videos 8]
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def start_worker(name: str, model: str, log: Path, threads: int) -> subprocess.Popen:
    from workers.pool.processes import worker_commands

    ((cmd, env),) = worker_commands([], "ask,prelabel", name=name)
    env = {**os.environ, **env, "STLLM_MODEL": model, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(
        cmd + ["--without-gossip", "--without-mingle"],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    while "serves" not in log.read_text() or "ready." not in log.read_text():
        if proc.poll() is not None:
            raise RuntimeError(log.read_text())
        time.sleep(0.2)
    return proc


def stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--videos", type=int, default=8)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="stllm-pool-"))
    from workers.pool.processes import start_redis

    redis, url = start_redis(work / "redis")
    os.environ["STLLM_BROKER_URL"] = url
    os.environ["STLLM_VISIBILITY_TIMEOUT"] = "15"
    os.environ["STLLM_RESTORE_INTERVAL"] = "1"
    from workers.pool import client, tasks
    from workers.tools.linevideo import generate_dataset

    try:
        w1 = start_worker("b1", args.model, work / "b1.log", 2)
        tasks.ping.delay().get(timeout=60)
        lat = []
        for _ in range(200):
            t = time.perf_counter()
            tasks.ping.delay().get(timeout=30)
            lat.append(time.perf_counter() - t)
        lat.sort()
        t = time.perf_counter()
        pending = [tasks.ping.delay() for _ in range(500)]
        for p in pending:
            p.get(timeout=60)
        rate = 500 / (time.perf_counter() - t)
        print(
            f"no-op round trip through Redis, 1 prefork worker: p50 {1000 * lat[100]:.1f} ms, "
            f"p95 {1000 * lat[190]:.1f} ms; {rate:.0f} tasks/s (500 queued at once)"
        )

        videos = [r["video"] for r in generate_dataset(work / "v", args.videos, seed=300, duration=30.0)]
        labels = ["jam", "hand", "defect", "part_passing", "empty_line"]
        t = time.perf_counter()
        client.wait(client.submit_prelabel(videos, labels, chunk_size=1), poll=0.1)
        one = time.perf_counter() - t
        t = time.perf_counter()
        client.wait(client.submit_prelabel(videos, labels, chunk_size=4), poll=0.1)
        batched = time.perf_counter() - t
        w2 = start_worker("b2", args.model, work / "b2.log", 1)
        stop(w1)
        w1 = start_worker("b1", args.model, work / "b1.log", 1)
        t = time.perf_counter()
        client.wait(client.submit_prelabel(videos, labels, chunk_size=1), poll=0.1)
        two = time.perf_counter() - t
        print(
            f"pre-label {args.videos} x 30 s videos ({args.model}), one video per task: 1 worker x 2 threads "
            f"{one:.1f}s ({60 * args.videos / one:.1f} videos/min), 2 workers x 1 thread {two:.1f}s "
            f"({60 * args.videos / two:.1f} videos/min) on 2 cores; 4 videos per task (the default), 1 worker "
            f"x 2 threads: {batched:.1f}s ({60 * args.videos / batched:.1f} videos/min)"
        )

        stop(w2)
        job = client.submit_prelabel(videos[:4], labels, chunk_size=4)  # only b1 is up: it takes the task
        while client.status(job).state == "PENDING":
            time.sleep(0.02)
        time.sleep(1.0)
        stop(w1, signal.SIGKILL)
        killed = time.perf_counter()
        w2 = start_worker("b2", args.model, work / "b2.log", 2)
        client.wait(job, poll=0.1)
        print(
            f"SIGKILL of a busy worker (visibility timeout 15 s, restore sweep 1 s): its task completed on "
            f"a fresh worker {time.perf_counter() - killed:.1f}s later"
        )
        stop(w2)
    finally:
        redis.terminate()
    print("\ncommand: .venv/bin/python " + shlex.join(sys.argv))


if __name__ == "__main__":
    main()
