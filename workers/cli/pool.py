"""``stllm worker`` and ``stllm up``: the pool's processes on this machine."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from workers.settings import current


def cmd_worker(args) -> int:
    from workers.pool.processes import detect_gpus, run_children, start_workers

    if not current().broker_url:
        raise SystemExit("stllm worker: set STLLM_BROKER_URL (e.g. redis://host:6379/0), or use 'stllm up'")
    os.environ["STLLM_MODEL"] = args.model  # the worker processes' environment
    gpus = args.gpus.split(",") if args.gpus else detect_gpus()
    logging.warning(
        "starting %d worker(s) on %s for queues %s", max(1, len(gpus)), gpus or "CPU", args.queues
    )
    return run_children(start_workers(gpus, args.queues))


def cmd_up(args) -> int:
    from workers.pool.processes import detect_gpus, run_children, start_redis, start_workers

    redis, url = start_redis(Path(args.state) / "redis", args.port)
    os.environ["STLLM_BROKER_URL"] = url  # the children's environment
    os.environ["STLLM_MODEL"] = args.model
    print(f"redis at {url}; export STLLM_BROKER_URL={url} to submit jobs", file=sys.stderr)
    gpus = args.gpus.split(",") if args.gpus else detect_gpus()
    children = start_workers(gpus, args.queues)
    if args.labelstudio:
        serve = [sys.executable, "-m", "workers.cli", "labelstudio", "serve", "--port", str(args.labelstudio)]
        children.append(subprocess.Popen(serve))
        print(f"Label Studio ML backend at http://127.0.0.1:{args.labelstudio}", file=sys.stderr)
    try:
        return run_children(children)
    finally:
        redis.terminate()
        redis.wait(10)


def add_parsers(sub) -> None:
    model = current().model
    p = sub.add_parser("worker", help="start pool workers: one process per GPU (or one on CPU)")
    p.add_argument("--gpus", default=None, help="GPU indices, e.g. 0,1 (default: all visible; none: CPU)")
    p.add_argument("--queues", default="ask,prelabel,finetune", help="queues to serve (default: all)")
    p.add_argument("--model", default=model, help=f"model the workers serve (default {model})")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("up", help="the whole stack on this machine: a private redis-server and the workers")
    p.add_argument("--gpus", default=None)
    p.add_argument("--queues", default="ask,prelabel,finetune")
    p.add_argument("--model", default=model)
    p.add_argument("--port", type=int, default=6379)
    p.add_argument("--state", default=".stllm", help="folder for redis data (default .stllm)")
    p.add_argument(
        "--labelstudio", type=int, metavar="PORT", default=None, help="also serve the Label Studio backend"
    )
    p.set_defaults(func=cmd_up)
