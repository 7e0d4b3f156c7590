"""``stllm round``: model stores and fine-tune rounds."""

from __future__ import annotations

import json
import sys
import time

from workers.cli.common import RoundProgress
from workers.schemas import PrelabelSettings, RoundSettings, TrainSettings, default
from workers.settings import current


def _list(store) -> None:
    reg = store.read()
    print(f"{'version':<10}{'parent':<10}{'promoted':<10}{'mAP@0.5':>9}{'mAP':>8}  snapshot      created")
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


def cmd_round(args) -> int:
    from workers.labelstudio.rest import LabelStudioError
    from workers.rounds.registry import ModelStore, RegistryError, RoundRunning

    store = ModelStore(args.store)
    try:
        if args.round_command == "init":
            from workers.rounds.run import init_store

            path = init_store(store, args.model)
            print(f"model store {store.root}: base version from {args.model} at {path}")
        elif args.round_command == "list":
            _list(store)
        elif args.round_command in ("promote", "rollback"):
            store.set_serving(args.version, args.round_command)
            print(f"serving {args.version}: workers switch before their next task")
        elif args.round_command == "start":
            return _round_start(args, store)
    except (RegistryError, RoundRunning, LabelStudioError) as e:
        print(f"stllm round {args.round_command}: {e}", file=sys.stderr)
        return 2
    return 0


def _corrections(args):
    """The round's corrections: a snapshot made here (JSON lines, Label Studio) or a FiftyOne reference."""
    from workers.schemas import FiftyOneCorrections, SnapshotCorrections

    if args.from_jsonl:
        from workers.rounds.corrections import snapshot_from_ground_truth

        return SnapshotCorrections(snapshot=snapshot_from_ground_truth(args.from_jsonl))
    if args.from_labelstudio is not None:
        from workers.labelstudio.rest import LabelStudioAPI, pull_corrections
        from workers.labelstudio.settings import BackendSettings
        from workers.rounds.corrections import snapshot_from_labelstudio

        ls = BackendSettings()
        pulled = pull_corrections(
            LabelStudioAPI.from_env(*ls.connection()), args.from_labelstudio, ls.document_root
        )
        for x in pulled["skipped"]:
            print(f"task {x['task']} skipped: {x['reason']}", file=sys.stderr)
        return SnapshotCorrections(snapshot=snapshot_from_labelstudio(pulled))
    if not args.gt_field:
        raise SystemExit("stllm round start: --from-fiftyone needs --gt-field")
    return FiftyOneCorrections(dataset=args.from_fiftyone, gt_field=args.gt_field, view=args.view)


def _round_start(args, store) -> int:
    from workers.pool import client
    from workers.schemas import RoundRequest, SnapshotCorrections

    corrections = _corrections(args)
    settings = RoundSettings(
        train=TrainSettings(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            masking=not args.no_masking,
            mvm=not args.no_mvm and not args.no_masking,
            seed=args.seed,
        ),
        prelabel=PrelabelSettings(window_s=args.window, stride_s=args.stride),
        margin=args.margin,
        gate_on=args.gate_on,
        force=args.force,
        next_batch=args.next,
        train_from=args.train_from,
    )
    if isinstance(corrections, SnapshotCorrections):
        snap = corrections.snapshot
        labels = [x.name for x in snap.labels]
        print(f"snapshot {snap.id}: {len(snap.videos)} videos, labels {labels}", file=sys.stderr)
    request = RoundRequest(
        corrections=corrections,
        settings=settings,
        store=str(store.root),
        candidates=_candidate_files(args.candidates),
    )
    bar = RoundProgress(args.steps)
    try:
        task_id = client.submit_round(request, bar)  # without a broker the round runs here
        if current().broker_url:
            print(f"round submitted to the finetune queue as {task_id}", file=sys.stderr)
        state, info = client.follow_round(task_id, bar)
    finally:
        bar.close()
    if state == "FAILURE":
        print(f"round failed, serving unchanged: {info.get('error')}", file=sys.stderr)
        return 1
    print(json.dumps(info, indent=2))
    for x in info.get("next_batch") or []:
        print(f"next: {x['video']}  (uncertainty {x['uncertainty']:.3f} about {x['label']})", file=sys.stderr)
    return 0


def _candidate_files(items: list[str]) -> list[str]:
    """Candidate videos from files and folders (every video file under a folder, recursively)."""
    from pathlib import Path

    out = []
    for item in items or []:
        path = Path(item)
        if path.is_dir():
            out += sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
        else:
            out.append(item)
    return out


VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts"}


def add_parsers(sub) -> None:
    train = TrainSettings.model_fields
    p = sub.add_parser("round", help="fine-tune rounds: init a model store, start, list, promote, roll back")
    p.add_argument(
        "--store", default=None, help="model store folder (default $STLLM_MODEL_STORE or ~/.stllm/models)"
    )
    rsub = p.add_subparsers(dest="round_command", required=True, metavar="ACTION")
    r = rsub.add_parser("init", help="create a model store whose base version is --model")
    r.add_argument("--model", default="builtin")
    r = rsub.add_parser(
        "start",
        help="train a candidate on corrections; promote it if it measures better",
        description="Trains LoRA adapters (ST-LLM masking + MVM) on the corrections together with every "
        "earlier round's, on windows chosen from the corrected events' durations; evaluates the candidate "
        "against the serving version on a held-back validation split and promotes it only if its gain is "
        "clear (a bootstrap interval above --margin; by default the fall in window error, every validation "
        "window's P(yes) against its target; --gate-on map: mAP@0.5) and it loses no label the serving "
        "version knew.",
    )
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
    for name, kind in (("steps", int), ("batch_size", int), ("lr", float), ("seed", int)):
        flag = "--" + name.replace("_", "-")
        r.add_argument(flag, type=kind, default=train[name].default, help=f"default {train[name].default}")
    r.add_argument(
        "--window",
        type=float,
        default=None,
        help="window length, seconds (default: chosen from the corrected events' durations, and recorded "
        "in the version so that pre-labeling with it uses the same)",
    )
    r.add_argument(
        "--stride", type=float, default=None, help="window stride, seconds (default: half a window)"
    )
    r.add_argument(
        "--margin",
        type=float,
        default=default(RoundSettings, "margin"),
        help="the lower end of the bootstrap interval of the gain must be above this to promote",
    )
    r.add_argument(
        "--gate-on",
        choices=("ranking", "windows", "map"),
        default=default(RoundSettings, "gate_on"),
        help="what the gain is measured on: windows (default), the fall in window error (per label the Brier "
        "score of every validation window's P(yes) against its target: the steadiest on a few videos), "
        "ranking, the rise in each label's window ROC-AUC (how well P(yes) orders the validation windows; near "
        "1 once a label is learnt), or map, mAP@0.5 (noisy on a small validation split); all three are reported",
    )
    r.add_argument("--force", action="store_true", help="promote the candidate whatever it measures")
    r.add_argument(
        "--train-from",
        choices=("serving", "base"),
        default=default(RoundSettings, "train_from"),
        help="serving (default): train on from the served version's adapters; base: fresh adapters on the "
        "base model (e.g. after a version that learned something wrong)",
    )
    r.add_argument(
        "--next",
        type=int,
        default=0,
        metavar="N",
        help="after the round, name the N videos most worth correcting next among --candidates (and, for "
        "--from-fiftyone with --view, the dataset's samples outside the view): the version then serving "
        "pre-labels them and the most uncertain win, labels taking turns; corrected videos never come back",
    )
    r.add_argument(
        "--candidates",
        nargs="+",
        default=[],
        metavar="PATH",
        help="videos or folders of videos not corrected yet (for --next)",
    )
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
