"""Fine-tune round figures on generated line videos with the builtin model: an ablation on the same data
and steps (masking+MVM vs masking only vs no masking: held-out mAP and training time each) and the round's
time split (collect / train / evaluate).

    .venv/bin/python bench/rounds.py [--steps 100] [--corrections 16] [--heldout 12]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--corrections", type=int, default=16)
    ap.add_argument("--heldout", type=int, default=12)
    args = ap.parse_args()
    from workers.jobs import prelabel_videos
    from workers.rounds.corrections import snapshot_from_ground_truth
    from workers.rounds.evaluation import evaluate
    from workers.rounds.registry import ModelStore
    from workers.rounds.run import RoundSettings, init_store, run_round
    from workers.schemas import PrelabelSettings, Segment, TrainSettings, parse_labels
    from workers.stllm.io import load_model
    from workers.tools.linevideo import EVENT_DESCRIPTIONS, generate_dataset

    work = Path(tempfile.mkdtemp(prefix="stllm-rounds-"))
    heldout = generate_dataset(work / "heldout", args.heldout, seed=1000, duration=30.0)
    generate_dataset(work / "corrections", args.corrections, seed=2000, duration=30.0)
    labels = parse_labels([f"{k}: {v}" for k, v in EVENT_DESCRIPTIONS.items()])
    snap = snapshot_from_ground_truth(work / "corrections" / "ground_truth.jsonl", labels)
    gt = {r["video"]: [Segment.model_validate(s) for s in r["segments"]] for r in heldout}
    pre = PrelabelSettings(window_s=2.0, stride_s=1.0, smoothing=1)
    print(
        f"builtin, {len(snap.videos)} corrected videos, {args.steps} steps x batch 8, held-out {args.heldout} videos"
    )
    print(
        f"{'training':<14}{'held-out mAP@0.5':>17}{'mAP':>8}{'train s':>9}{'s/step':>8}   collect / train / evaluate (s)"
    )
    for name, masking, mvm in (
        ("masking+MVM", True, True),
        ("masking only", True, False),
        ("no masking", False, False),
    ):
        store = ModelStore(work / name.replace(" ", "_").replace("+", "_"))
        init_store(store, "builtin")
        settings = RoundSettings(
            train=TrainSettings(steps=args.steps, batch_size=8, lr=2e-3, masking=masking, mvm=mvm),
            prelabel=pre,
            force=True,
        )
        t = time.perf_counter()
        result = run_round(store, snap, settings)
        model = load_model(store.version_dir(result.version), dtype="auto")
        results = prelabel_videos(model, list(gt), labels, pre)
        report = evaluate({r.video: [Segment.model_validate(s) for s in r.segments] for r in results}, gt)
        tm = result.timings
        print(
            f"{name:<14}{report.map_at(0.5):>17.3f}{report.mean_ap:>8.3f}{tm['train_s']:>9.1f}"
            f"{tm['train_s'] / args.steps:>8.2f}   {tm['collect_s']:.0f} / {tm['train_s']:.0f} / {tm['evaluate_s']:.0f}"
            f"   (round {time.perf_counter() - t:.0f}s)",
            flush=True,
        )
    print("\ncommand: .venv/bin/python " + shlex.join(sys.argv))


if __name__ == "__main__":
    main()
