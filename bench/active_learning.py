"""Active-learning curve: which videos should annotators correct first? Videos picked by the model's
uncertainty (workers.review) against videos picked at random, at budgets of 4, 8 and 16 corrected videos.

    .venv/bin/python bench/active_learning.py [--sets line scenes] [--budgets 4 8 16] [--seeds 0 1 2]
                                              [--steps 100] [--png bench/active_learning.png]

Per event set, a pool of uncorrected videos and a held-out set:
    line     24 pool videos of the line benchmark (30 s), the demo's 12 held-out videos
    scenes   20 pool videos of the second event set (workers.tools.scenevideo), 8 held-out
Each strategy starts from the base model. random: seed s orders the pool, the first 4 / 8 / 16 are
corrected. uncertainty: the model serving at each step (the base model first, then each round's) pre-labels
the videos not yet corrected and ``workers.review.next_batch`` picks up to the budget, labels taking turns.
At each budget one round trains fresh on every video picked so far (seed s, the product's settings, a
validation split by video for thresholds) and is measured on the held-out set: mAP@0.5. Both strategies use
the windows the whole pool's events give (so the features are encoded once). Prints both curves as a table
(mean ± sd over seeds) and writes a PNG of every set's curve: each set's is kept in ``--work`` as
``curve-<set>.json``, so sets run one at a time share the plot.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path


def event_set(name: str, work: Path):
    """(labels, pool snapshot, held-out snapshot) of an event set, generated once under ``work``."""
    from workers.rounds.corrections import snapshot_from_ground_truth
    from workers.schemas import parse_labels

    if name == "line":
        from workers.tools.linevideo import EVENT_DESCRIPTIONS as desc
        from workers.tools.linevideo import generate_dataset

        def make(d, n, seed):
            return generate_dataset(d, n, seed=seed, duration=30.0)

        plan = {"pool": (24, 4000), "heldout": (12, 1000)}
    else:
        from workers.tools.scenevideo import SCENE_DESCRIPTIONS as desc
        from workers.tools.scenevideo import generate_scene_dataset

        def make(d, n, seed):
            return generate_scene_dataset(d, n, seed=seed)

        plan = {"pool": (20, 902), "heldout": (8, 900)}
    labels = parse_labels([f"{k}: {v}" for k, v in desc.items()])
    out = []
    for part, (n, seed) in plan.items():
        d = work / name / part
        if not (d / "ground_truth.jsonl").exists():
            make(d, n, seed)
        out.append(snapshot_from_ground_truth(d / "ground_truth.jsonl", labels))
    return labels, out[0], out[1]


def subset(snapshot, ids: list[str]):
    from workers.schemas import Snapshot

    chosen = [v for v in snapshot.videos if v.video_id in set(ids)]
    return Snapshot(labels=snapshot.labels, videos=chosen, sources=snapshot.sources).frozen()


def events(snapshot, ids: list[str]) -> str:
    """How many events of each label the videos ``ids`` hold (what a pick gave the round to learn from)."""
    from collections import Counter

    chosen = set(ids)
    counts = Counter(s.label for v in snapshot.videos if v.video_id in chosen for s in v.segments)
    return " ".join(f"{label.name[:6]} {counts[label.name]}" for label in snapshot.labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=["line", "scenes"], choices=["line", "scenes"])
    ap.add_argument("--budgets", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--png", type=Path, default=Path("bench/active_learning.png"))
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "stllm-active")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from lab import Lab, mean_sd

    from workers.review import next_batch, video_uncertainty
    from workers.rounds.corrections import choose_windows
    from workers.stllm.io import load_model

    t0 = time.perf_counter()
    curves: dict[str, dict[str, dict[int, list[float]]]] = {}
    for name in args.sets:
        labels, pool, heldout = event_set(name, args.work)
        windows = choose_windows(pool)
        lab = Lab(args.work / name, labels, windows)
        base = lab.base()
        ids = [v.video_id for v in pool.videos]
        print(
            f"{name}: pool {len(ids)} videos, held-out {len(heldout.videos)}, windows {windows}", flush=True
        )
        curve = curves.setdefault(name, {"random": {}, "uncertainty": {}})
        for seed in args.seeds:
            order = ids[:]
            random.Random(seed).shuffle(order)
            for budget in args.budgets:
                model, th, train_s = lab.train(
                    subset(pool, order[:budget]), base, {"steps": args.steps}, seed
                )
                m = lab.measure(model, base, heldout, th, train_s)
                curve["random"].setdefault(budget, []).append(m.map50)
                print(
                    f"  random       seed {seed} budget {budget:>2}: mAP@0.5 {m.map50:.3f}"
                    f"  events {events(pool, order[:budget])}",
                    flush=True,
                )

            picked: list[str] = []
            model, th = load_model(base, dtype="auto"), {}
            for budget in args.budgets:
                rest = [v for v in pool.videos if v.video_id not in picked]
                results = lab.probabilities(model, base, rest)
                per = {
                    i: video_uncertainty(r.window_probs, lambda label, th=th: th.get(label, 0.5))[1]
                    for i, r in results.items()
                }
                picked += [x["video"] for x in next_batch(per, budget - len(picked), exclude=set(picked))]
                model, th, train_s = lab.train(subset(pool, picked), base, {"steps": args.steps}, seed)
                m = lab.measure(model, base, heldout, th, train_s)
                curve["uncertainty"].setdefault(budget, []).append(m.map50)
                print(
                    f"  uncertainty  seed {seed} budget {budget:>2}: mAP@0.5 {m.map50:.3f}"
                    f"  events {events(pool, picked)}",
                    flush=True,
                )

    print("\nheld-out mAP@0.5 after one round on the picked videos, mean ± sd over seeds", args.seeds)
    print(f"{'set':<8}{'picks':<13}" + "".join(f"{f'{b} videos':>18}" for b in args.budgets))
    for name, curve in curves.items():
        for strategy, by_budget in curve.items():
            print(f"{name:<8}{strategy:<13}" + "".join(f"{mean_sd(by_budget[b]):>18}" for b in args.budgets))
    for name, curve in curves.items():  # each set's curve kept, so one PNG shows sets run at different times
        (args.work / f"curve-{name}.json").write_text(json.dumps(curve))
    for saved in sorted(args.work.glob("curve-*.json")):
        name = saved.stem.removeprefix("curve-")
        if name not in curves:
            print(f"(the plot also shows the {name} curve saved in {saved})")
            curves[name] = {
                k: {int(b): v for b, v in c.items()} for k, c in json.loads(saved.read_text()).items()
            }
    _plot(curves, args.budgets, args.png)
    print(f"\nwrote {args.png}; {time.perf_counter() - t0:.0f} s in all")
    print(f"command: .venv/bin/python bench/active_learning.py {shlex.join(sys.argv[1:])}")


def _plot(curves: dict, budgets: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.6), squeeze=False)
    for ax, (name, curve) in zip(axes[0], curves.items(), strict=True):
        for strategy, by_budget in curve.items():
            mean = [np.mean(by_budget[b]) for b in budgets]
            sd = [np.std(by_budget[b], ddof=1) if len(by_budget[b]) > 1 else 0 for b in budgets]
            ax.errorbar(budgets, mean, yerr=sd, marker="o", capsize=3, label=f"{strategy} picks")
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_xlabel("corrected videos")
        ax.set_ylabel("held-out mAP@0.5")
        ax.set_title(f"{name} event set")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
