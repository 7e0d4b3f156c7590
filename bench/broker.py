"""What a job costs the broker as it grows: bytes per queued message and Redis memory for a FiftyOne-style
pre-label job (its sink maps every video to a sample id) of 1k, 10k and 50k videos, submitted with no worker
running, 4 videos per task.

    .venv/bin/python bench/broker.py [--sizes 1000 10000 50000]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="stllm-broker-"))
    from workers.pool.processes import start_redis

    redis_proc, url = start_redis(work / "redis")
    os.environ["STLLM_BROKER_URL"] = url
    try:
        from redis import Redis

        from workers.pool import client
        from workers.schemas import FiftyOneSinkSpec

        r = Redis.from_url(url)
        print(f"{'videos':>8} {'messages':>9} {'bytes/message (max)':>20} {'Redis used memory':>18}")
        for n in args.sizes:
            r.flushall()
            base = int(r.info("memory")["used_memory"])
            videos = [f"/data/line/shift-{i:06d}.mp4" for i in range(n)]
            sink = FiftyOneSinkSpec(
                dataset="line",
                field="events",
                job="prelabel",
                ids={v: f"{i:024x}" for i, v in enumerate(videos)},
            )
            client.submit_prelabel(videos, ["jam", "hand", "defect"], sink=sink)
            messages = r.lrange("prelabel", 0, -1)
            sizes = [len(m) for m in messages]
            used = int(r.info("memory")["used_memory"]) - base
            body = json.loads(messages[0])
            assert "body" in body
            print(f"{n:>8} {len(messages):>9} {max(sizes):>20,} {used / 2**20:>15.1f} MiB")
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)


if __name__ == "__main__":
    main()
