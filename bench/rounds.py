"""Fine-tune round figures on generated line videos with the builtin model: the method ablation on the same
data and steps (masking+MVM vs masking only vs no masking), over several seeds, as held-out mAP@0.5 mean and
standard deviation, with each round's time split (collect / train / evaluate).

Every round uses the product's defaults (windows chosen from the corrections, edge refinement); only the
method switches and the seed change.

    .venv/bin/python bench/rounds.py [--steps 100] [--corrections 16] [--heldout 12] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SETTINGS = (("masking+MVM", True, True), ("masking only", True, False), ("no masking", False, False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--corrections", type=int, default=16)
    ap.add_argument("--heldout", type=int, default=12)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", choices=[s[0] for s in SETTINGS], nargs="+", help="run only these settings")
    args = ap.parse_args()
    from workers.jobs import prelabel_videos
    from workers.rounds.corrections import snapshot_from_ground_truth
    from workers.rounds.evaluation import evaluate
    from workers.rounds.registry import ModelStore
    from workers.rounds.run import RoundSettings, init_store, run_round
    from workers.schemas import PrelabelSettings, Segment, TrainSettings, parse_labels
    from workers.stllm.io import load_model
    from workers.tools.linevideo import EVENT_DESCRIPTIONS, EVENTS, generate_dataset

    work = Path(tempfile.mkdtemp(prefix="stllm-rounds-"))
    heldout = generate_dataset(work / "heldout", args.heldout, seed=1000, duration=30.0)
    generate_dataset(work / "corrections", args.corrections, seed=2000, duration=30.0)
    labels = parse_labels([f"{k}: {v}" for k, v in EVENT_DESCRIPTIONS.items()])
    snap = snapshot_from_ground_truth(work / "corrections" / "ground_truth.jsonl", labels)
    gt = {r["video"]: [Segment.model_validate(s) for s in r["segments"]] for r in heldout}
    print(
        f"builtin, {len(snap.videos)} corrected videos, {args.steps} steps x batch 8, held-out {args.heldout} "
        f"videos, seeds {args.seeds}",
        flush=True,
    )
    chosen = [s for s in SETTINGS if not args.only or s[0] in args.only]
    table: dict[str, list[tuple[float, dict, dict]]] = {}
    for seed in args.seeds:  # seed by seed, so that a run cut short still compares every setting
        for name, masking, mvm in chosen:
            store = ModelStore(work / f"{name.replace(' ', '_').replace('+', '_')}-{seed}")
            init_store(store, "builtin")
            train = TrainSettings(steps=args.steps, masking=masking, mvm=mvm, seed=seed)
            t = time.perf_counter()
            result = run_round(store, snap, RoundSettings(train=train, force=True))
            model = load_model(store.version_dir(result.version), dtype="auto")
            results = prelabel_videos(model, list(gt), labels, PrelabelSettings())
            report = evaluate({r.video: r.segments for r in results}, gt)
            table.setdefault(name, []).append((report.map_at(0.5), report.per_label(0.5), result.timings))
            tm = result.timings
            print(
                f"  {name:<13} seed {seed}: held-out mAP@0.5 {report.map_at(0.5):.3f}  "
                + " ".join(f"{e} {report.per_label(0.5).get(e, 0):.2f}" for e in EVENTS)
                + f"   collect / train / evaluate {tm['collect_s']:.0f} / {tm['train_s']:.0f} / "
                f"{tm['evaluate_s']:.0f} s (round {time.perf_counter() - t:.0f} s)",
                flush=True,
            )
    print(f"\n{'training':<14}{'mAP@0.5 mean ± sd':>20}{'train s/step':>14}   per label (mean)")
    for name, rows in table.items():
        maps = np.array([r[0] for r in rows])
        per = {e: np.mean([r[1].get(e, 0.0) for r in rows]) for e in EVENTS}
        step_s = np.mean([r[2]["train_s"] for r in rows]) / args.steps
        print(
            f"{name:<14}{maps.mean():>12.3f} ± {maps.std(ddof=1) if len(maps) > 1 else 0:.3f}{step_s:>14.2f}   "
            + " ".join(f"{e} {v:.2f}" for e, v in per.items())
        )
    print("\ncommand: .venv/bin/python " + shlex.join(sys.argv))


if __name__ == "__main__":
    main()
