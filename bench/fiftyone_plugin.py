"""FiftyOne plugin figures: how long the pre-label operator takes to return on a 200-video view (it only
submits), and end-to-end time for 20 generated videos through one CPU worker (builtin model).

    .venv/bin/python bench/fiftyone_plugin.py
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="stllm-fo-"))
    os.environ["FIFTYONE_DATABASE_DIR"] = str(work / "db")
    os.environ["FIFTYONE_PLUGINS_DIR"] = str(work / "plugins")
    os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
    from workers.cli.fiftyone import install_fiftyone_plugin
    from workers.pool.processes import start_redis, worker_commands

    install_fiftyone_plugin(work / "plugins")
    redis, url = start_redis(work / "redis")
    os.environ["STLLM_BROKER_URL"] = url
    import fiftyone as fo
    import fiftyone.operators as foo

    from workers.pool import client
    from workers.tools.linevideo import generate_dataset

    try:
        records = generate_dataset(work / "v", 20, seed=700, duration=30.0)
        paths = [r["video"] for r in records]
        big = fo.Dataset()
        big.add_samples([fo.Sample(filepath=paths[i % 20]) for i in range(200)])
        foo.execute_operator("@stllm/labeling/job_status", dataset=big)  # warm the registry
        t = time.perf_counter()
        res = foo.execute_operator(
            "@stllm/labeling/prelabel_events", dataset=big, params={"labels": ["jam", "hand"]}
        )
        print(
            f"pre-label operator on a 200-video view returned in {1000 * (time.perf_counter() - t):.0f} ms "
            f"(job {res.result['job_id'][:8]}, {res.result['videos']} videos queued)"
        )
        big.delete()
        # drop the 200-video job's tasks so the next figure starts from an empty queue
        import redis as redis_py

        redis_py.Redis.from_url(url).flushdb()

        ((cmd, env),) = worker_commands([], "ask,prelabel", name="bench")
        log = open(work / "worker.log", "w")
        worker = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
        while (
            "ready." not in (work / "worker.log").read_text()
            or "serves" not in (work / "worker.log").read_text()
        ):
            time.sleep(0.2)
        ds = fo.Dataset()
        ds.add_samples([fo.Sample(filepath=p) for p in paths])
        labels = ["part_passing", "jam", "defect", "empty_line", "hand"]
        t = time.perf_counter()
        res = foo.execute_operator("@stllm/labeling/prelabel_events", dataset=ds, params={"labels": labels})
        client.wait(res.result["job_id"], poll=0.2)
        wall = time.perf_counter() - t
        ds.reload()
        print(
            f"end to end, 20 x 30 s videos, 5 labels, one CPU worker (builtin): {wall:.1f}s "
            f"({20 * 60 / wall:.1f} videos/min); {len(ds.exists('stllm_events'))} samples labeled"
        )
        worker.terminate()
        worker.wait(60)
    finally:
        redis.terminate()
    print("\ncommand: .venv/bin/python " + shlex.join(sys.argv))


if __name__ == "__main__":
    main()
