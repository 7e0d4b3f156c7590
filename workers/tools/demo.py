"""``stllm demo``: the whole loop on the embedded default with the builtin model.

1. generate factory-line videos: a held-out set, and two batches standing in for annotators' corrections;
2. pre-label the held-out set with the base model, next to a random and a constant predictor;
3. round 1 on the first batch of corrections, round 2 on the second (the store keeps the first: round 2
   trains on both); each round chooses its windows from the corrections and is gated on its validation split;
4. print mAP@0.5 and per-label AP of every version on the held-out set, each with its own windows as it would
   serve, beside the ceiling of those windows (perfect window probabilities) and the effect of edge
   refinement; write demo.json and demo.png.

Every setting is the product's default: what a user gets from ``stllm round start`` and ``stllm prelabel``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from workers.events import covered_shares
from workers.jobs import prelabel_videos, result_segments
from workers.rounds.corrections import snapshot_from_ground_truth
from workers.rounds.evaluation import EvaluationReport, evaluate, window_auc
from workers.rounds.registry import ModelStore
from workers.rounds.run import RoundSettings, init_store, run_round
from workers.schemas import PrelabelResult, PrelabelSettings, Segment, TrainSettings, parse_labels
from workers.tools.linevideo import EVENT_DESCRIPTIONS, EVENTS, generate_dataset


def baseline_segments(
    result: PrelabelResult, kind: str, settings: PrelabelSettings, rng: np.random.Generator
) -> list[Segment]:
    """Segments of a baseline on the windows of ``result``: 'random' draws each window's P(yes) uniformly;
    'constant' predicts every label over the whole video."""
    meta = result.meta
    if kind == "constant":
        return [
            Segment.from_seconds(label, 0.0, meta.duration, meta.fps, meta.n_frames, 1.0) for label in EVENTS
        ]
    drawn = {label: list(rng.uniform(0, 1, len(result.windows))) for label in EVENTS}
    return result_segments(result.model_copy(update={"window_probs": drawn}), EVENTS, settings)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _evaluate_version(
    model, videos: list[str], gt: dict, settings: PrelabelSettings, labels
) -> tuple[EvaluationReport, list]:
    from tqdm import tqdm

    with tqdm(total=len(videos), desc=f"pre-label ({model.version})", unit="video", file=sys.stderr) as bar:
        results = prelabel_videos(model, videos, labels, settings, progress=lambda _: bar.update(1))
    preds = {r.video: [Segment.model_validate(s) for s in r.segments] for r in results}
    return evaluate(preds, gt), results


def _coverage_segments(
    result: PrelabelResult, gt: list[Segment], settings: PrelabelSettings
) -> list[Segment]:
    """The ceiling of a version's windows: segments from perfect window probabilities (the share of each
    window the ground truth covers), through the same thresholds, merging and edge refinement."""
    spans = [tuple(w) for w in result.windows]
    perfect = {label: covered_shares([g for g in gt if g.label == label], spans).tolist() for label in EVENTS}
    return result_segments(result.model_copy(update={"window_probs": perfect}), EVENTS, settings)


def _aucs(results: list[PrelabelResult], gt: dict) -> dict[str, float | None]:
    ok = [r for r in results if r.error is None]
    return window_auc(
        {r.video: [tuple(w) for w in r.windows] for r in ok},
        {r.video: r.window_probs for r in ok},
        gt,
        EVENTS,
    )


def _unrefined(result: PrelabelResult, settings: PrelabelSettings) -> list[Segment]:
    """The same window probabilities as ``result``, merged with edges at the windows' bounds."""
    return result_segments(result, EVENTS, settings.model_copy(update={"refine_edges": False}))


def _plot(rows: dict[str, EvaluationReport], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(names)
    x = np.arange(len(EVENTS) + 1)
    for i, name in enumerate(names):
        per = rows[name].per_label(0.5)
        vals = [rows[name].map_at(0.5)] + [per.get(e, 0.0) for e in EVENTS]
        ax.bar(x + i * width, vals, width, label=name)
    ax.set_xticks(x + width * (len(names) - 1) / 2, ["mAP@0.5", *EVENTS], rotation=15)
    ax.set_ylabel("AP at tIoU 0.5 (held-out)")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("Pre-label quality per model version")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_demo(
    workdir: Path,
    n_heldout: int = 12,
    n_corrections: int = 16,
    duration: float = 30.0,
    steps: int | None = None,
    model_name: str = "builtin",
) -> dict:
    """Run the demo in ``workdir`` (replaced); returns the summary written to ``demo.json``."""
    import shutil

    from workers.stllm.io import load_model

    t0 = time.perf_counter()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    _say(
        f"[1/4] generating {n_heldout} held-out and 2 x {n_corrections} corrected line videos ({duration:.0f}s each)"
    )
    heldout = generate_dataset(workdir / "heldout", n_heldout, seed=1000, duration=duration)
    generate_dataset(workdir / "batch1", n_corrections, seed=2000, duration=duration)
    generate_dataset(workdir / "batch2", n_corrections, seed=3000, duration=duration)
    labels = parse_labels([f"{k}: {v}" for k, v in EVENT_DESCRIPTIONS.items()])
    gt = {r["video"]: [Segment.model_validate(s) for s in r["segments"]] for r in heldout}
    videos = list(gt)
    pre = PrelabelSettings()  # each version's own windows: what it serves with

    store = ModelStore(workdir / "store")
    init_store(store, model_name)
    _say(f"[2/4] base model ({model_name}) on the held-out set")
    rows: dict[str, EvaluationReport] = {}
    base_report, base_results = _evaluate_version(
        load_model(store.version_dir("base"), dtype="auto"), videos, gt, pre, labels
    )
    base_pre = pre.resolved()
    rng = np.random.default_rng(0)
    rows["random"] = evaluate(
        {r.video: baseline_segments(r, "random", base_pre, rng) for r in base_results}, gt
    )
    rows["constant"] = evaluate(
        {r.video: baseline_segments(r, "constant", base_pre, rng) for r in base_results}, gt
    )
    rows["base"] = base_report
    aucs = {"base": _aucs(base_results, gt)}

    batches = [
        snapshot_from_ground_truth(workdir / f"batch{i}" / "ground_truth.jsonl", labels) for i in (1, 2)
    ]
    train = TrainSettings() if steps is None else TrainSettings(steps=steps)
    steps = train.steps
    settings = RoundSettings(train=train)
    rounds, edges, ceilings = [], {}, {}
    for i, snap in enumerate(batches, start=1):
        _say(f"[3/4] round {i}: {len(snap.videos)} new corrected videos, {steps} steps (masking + MVM)")

        def show(stage: str, info: dict) -> None:
            if stage not in ("train", "features") or (stage == "train" and info["step"] % 25 == 0):
                _say(f"      {stage}: {info}")

        result = run_round(store, snap, settings, progress=show)
        record = store.read()["versions"][result.version]
        rounds.append(
            {
                "version": result.version,
                "promoted": result.promoted,
                "reason": result.reason,
                "windows": record["windows"],
                "thresholds": record["prelabel_defaults"].get("thresholds", {}),
                "gate": record["gate"],
                "timings": result.timings,
            }
        )
        _say(f"      {result.reason} -> {'promoted' if result.promoted else 'not promoted'}")
        version_pre = pre.resolved(record["prelabel_defaults"])
        rows[result.version], results = _evaluate_version(
            load_model(store.version_dir(result.version), dtype="auto"), videos, gt, pre, labels
        )
        aucs[result.version] = _aucs(results, gt)
        plain = evaluate({r.video: _unrefined(r, version_pre) for r in results}, gt)
        edges[result.version] = {
            "refined": [round(rows[result.version].map_at(t), 4) for t in (0.5, 0.7)],
            "window_bounds": [round(plain.map_at(t), 4) for t in (0.5, 0.7)],
        }
        ceilings[result.version] = evaluate(
            {r.video: _coverage_segments(r, gt[r.video], version_pre) for r in results}, gt
        )

    _say("[4/4] held-out results")
    serving = store.serving()[0]
    header = f"{'version':<10}{'mAP@0.5':>9}{'mAP':>8}  " + "".join(f"{e[:11]:>12}" for e in EVENTS)
    print(f"\nheld-out set: {n_heldout} videos; AP@0.5 per label; serving now: {serving}\n{header}")
    for name, rep in rows.items():
        per = rep.per_label(0.5)
        print(
            f"{name:<10}{rep.map_at(0.5):>9.3f}{rep.mean_ap:>8.3f}  "
            + "".join(f"{per.get(e, 0):>12.3f}" for e in EVENTS)
        )
    print("\nwindow ROC-AUC per label (P(yes) of each window against its target)")
    for name, per in aucs.items():
        print(
            f"{name:<10}{'':>17}  "
            + "".join(f"{per[e]:>12.3f}" if per[e] is not None else f"{'-':>12}" for e in EVENTS)
        )
    print("\nthe ceiling of each round's windows (perfect window probabilities), and edge refinement:")
    print(
        f"{'version':<10}{'windows':>12}{'ceiling mAP@0.5':>17}   mAP@0.5 / @0.7 refined   at window bounds"
    )
    for r in rounds:
        v, w, e = r["version"], r["windows"], edges[r["version"]]
        print(
            f"{v:<10}{w['window_s']:>7.1f}/{w['stride_s']:<4.1f}{ceilings[v].map_at(0.5):>17.3f}   "
            f"{e['refined'][0]:>7.3f} / {e['refined'][1]:.3f}        {e['window_bounds'][0]:.3f} / {e['window_bounds'][1]:.3f}"
        )
    summary = {
        "heldout_videos": n_heldout,
        "duration_s": duration,
        "steps_per_round": steps,
        "serving": serving,
        "rounds": rounds,
        "table": {name: rep.to_dict() for name, rep in rows.items()},
        "ceiling": {v: rep.to_dict() for v, rep in ceilings.items()},
        "edges": edges,
        "window_auc": aucs,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (workdir / "demo.json").write_text(json.dumps(summary, indent=2))
    _plot(
        {k: v for k, v in rows.items() if k not in ("random", "constant")} | {"random": rows["random"]},
        workdir / "demo.png",
    )
    print(f"\nwrote {workdir / 'demo.json'} and {workdir / 'demo.png'} in {summary['seconds']:.0f}s")
    return summary
