"""``stllm prelabel``, ``ask``, ``generate``, ``evaluate``, ``eval mc``, ``convert-stllm`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from workers.cli.common import add_model_args, emit, emit_job, load_model_for, progress_bar
from workers.schemas import AskSettings, PrelabelSettings, default
from workers.settings import current


def cmd_prelabel(args) -> int:
    from workers.jobs import prelabel_videos
    from workers.schemas import parse_labels

    labels = parse_labels(args.labels)
    chosen = {
        "window_s": args.window,
        "stride_s": args.stride,
        "frames_per_window": args.frames,
        "high": args.high,
        "low": args.low,
        "smoothing": args.smoothing,
    }
    settings = PrelabelSettings(**{k: v for k, v in chosen.items() if v is not None})
    if current().broker_url:
        from workers.pool import client

        return emit_job(client.submit_prelabel(args.videos, labels, settings), len(args.videos))
    model = load_model_for(args)
    bar, update = progress_bar(len(args.videos), "pre-label")
    results = prelabel_videos(model, args.videos, labels, settings, progress=update)
    bar.close()
    return 0 if emit(results) or not results else 1


def cmd_ask(args) -> int:
    from workers.jobs import ask_videos

    if not args.question.strip():
        raise SystemExit("stllm ask: the question is empty")
    settings = AskSettings(frames=args.frames)
    if current().broker_url:
        from workers.pool import client

        return emit_job(client.submit_ask(args.videos, args.question, settings), len(args.videos))
    model = load_model_for(args)
    bar, update = progress_bar(len(args.videos), "ask")
    results = ask_videos(model, args.videos, args.question, settings, progress=update)
    bar.close()
    return 0 if emit(results) or not results else 1


def cmd_generate(args) -> int:
    from workers.tools.linevideo import generate_dataset

    duration = tuple(args.duration) if len(args.duration) == 2 else args.duration[0]
    bar, _ = progress_bar(args.count, "generate")
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
    bar.close()
    print(f"wrote {args.count} videos and {Path(args.directory) / 'ground_truth.jsonl'}")
    return 0


def cmd_evaluate(args) -> int:
    from workers.rounds.evaluation import evaluate
    from workers.schemas import Segment
    from workers.tools.linevideo import load_ground_truth

    gt = {
        Path(r["video"]).name: [Segment.model_validate(s) for s in r["segments"]]
        for r in load_ground_truth(args.ground_truth)
    }
    preds = {}
    with open(args.predictions) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                if not r.get("error"):
                    preds[Path(r["video"]).name] = [Segment.model_validate(s) for s in r["segments"]]
    report = evaluate(preds, {k: v for k, v in gt.items() if k in preds})
    print(json.dumps(report.to_dict(), indent=2))
    return 0


def cmd_convert_stllm(args) -> int:
    from workers.stllm.convert import ConversionError, convert_stllm

    try:
        out = convert_stllm(
            args.src, args.dst, qformer_tokenizer=args.qformer_tokenizer, version=args.version
        )
    except ConversionError as e:
        print(f"stllm convert-stllm: {e}", file=sys.stderr)
        return 2
    print(f"converted {args.src} -> {out} (version {args.version}); use it as --model {out}", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from workers.tools.mc import MODES, evaluate_mc, load_questions

    questions = load_questions(args.file, args.video_root)[: args.limit]
    modes = tuple(m for m in args.modes.split(",") if m)
    if not modes or set(modes) - set(MODES):
        raise ValueError(f"--modes takes a comma-separated subset of {list(MODES)}")
    model = load_model_for(args)
    bar, _ = progress_bar(len(questions), "mc", unit="question")
    result = evaluate_mc(model, questions, modes, progress=lambda _: bar.update(1))
    bar.close()
    tasks = sorted({t for m in modes for t in result[m]["per_task"]})
    print(f"{'task':<24}" + "".join(f"{m:>10}" for m in modes))
    for t in tasks:
        print(
            f"{t:<24}" + "".join(f"{100 * result[m]['per_task'].get(t, float('nan')):>9.1f}%" for m in modes)
        )
    print(f"{'overall':<24}" + "".join(f"{100 * result[m]['overall']:>9.1f}%" for m in modes))
    for failed in result["failed"][:10]:
        print(f"failed (counted wrong): {failed['video']}: {failed['error']}", file=sys.stderr)
    print(f"{result['n']} questions, {result['errors']} failed (counted wrong); model {model.version}")
    if args.out:
        Path(args.out).write_text(json.dumps({**result, "model_version": model.version}, indent=1))
    return 0 if result["errors"] < result["n"] else 1


def cmd_demo(args) -> int:
    from workers.tools.demo import run_demo

    run_demo(Path(args.workdir), n_heldout=args.videos, duration=args.duration, steps=args.steps)
    return 0


def add_parsers(sub) -> None:
    pre = PrelabelSettings.model_fields
    p = sub.add_parser("prelabel", help="pre-label events on videos (segments with scores, JSON lines)")
    p.add_argument("videos", nargs="+", help="video files")
    p.add_argument(
        "--labels", nargs="+", required=True, help="event labels: 'name' or 'name: one-line description'"
    )
    p.add_argument(
        "--window",
        type=float,
        default=None,
        help="window length, seconds (default: the windows the model version's round chose, else 4)",
    )
    p.add_argument("--stride", type=float, default=None, help="window stride, seconds (default: as --window)")
    p.add_argument("--frames", type=int, default=pre["frames_per_window"].default, help="frames per window")
    p.add_argument(
        "--high",
        type=float,
        default=None,
        help="P(yes) that starts an event (default: each label's threshold the model version's round chose, "
        "else 0.5)",
    )
    p.add_argument(
        "--low",
        type=float,
        default=None,
        help="P(yes) that keeps an event going (default 0.1 below --high)",
    )
    p.add_argument("--smoothing", type=int, default=pre["smoothing"].default, help="moving average, windows")
    add_model_args(p)
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
        "--frames", type=int, default=default(AskSettings, "frames"), help="frames given at full tokens"
    )
    add_model_args(p)
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

    p = sub.add_parser(
        "convert-stllm",
        help="convert a released ST-LLM checkpoint into a model directory (strict: every key must map)",
        description="SRC is a checkpoint directory of the ST-LLM release (config.json, tokenizer, sharded or "
        "single .bin, or safetensors). Every key is renamed into transformers' InstructBlipVideo layout, the "
        "temporal adapter and ST-LLM's own parts; a key that maps nowhere, or a parameter left unfilled, stops "
        "the conversion with the names listed.",
    )
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument(
        "--qformer-tokenizer",
        default="bert-base-uncased",
        help="the Q-Former's BERT tokenizer: hub id or local path (default bert-base-uncased)",
    )
    p.add_argument("--version", default="st-llm", help="the version name predictions will carry")
    p.set_defaults(func=cmd_convert_stllm)

    p = sub.add_parser("eval", help="evaluations: 'eval mc' = multiple-choice video QA (MVBench style)")
    esub = p.add_subparsers(dest="eval_command", required=True, metavar="KIND")
    e = esub.add_parser(
        "mc",
        help="accuracy per task and overall, by the paper's generation and by option likelihood",
        description="FILE: a JSON list or JSON lines of {video, start?, end?, question, options (or "
        "candidates), answer, task?}; or a downloaded MVBench's json/ folder (its per-task files; videos "
        "under the video/ folder beside it, or --video-root). Frames, prompt, Q-Former text and letter "
        "scoring follow the original ST-LLM MVBench code; a video that cannot be read is listed and "
        "counted wrong.",
    )
    e.add_argument("file", help="questions file, or MVBench's json/ folder")
    e.add_argument(
        "--video-root", help="MVBench: the folder holding star/, ssv2_video/, ... (default: ../video)"
    )
    add_model_args(e)
    e.add_argument("--modes", default="generate,score", help="generate,score (default both)")
    e.add_argument("--limit", type=int, default=None, help="only the first N questions")
    e.add_argument("--out", help="write the accuracies and every item's answers as JSON here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "demo",
        help="the whole loop: generated videos, base pre-labels, two fine-tune rounds, held-out mAP table",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--workdir", default=".stllm-demo", help="folder for videos, model store and results (replaced)"
    )
    p.add_argument("--videos", type=int, default=12, help="held-out videos")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per video")
    p.add_argument(
        "--steps", type=int, default=None, help="training steps per round (default: the rounds' own)"
    )
    p.set_defaults(func=cmd_demo)
