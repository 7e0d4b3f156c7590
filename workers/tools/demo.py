"""``stllm demo``: the whole loop on the embedded default with the builtin model.

1. generate factory-line videos: a held-out set, and two batches standing in for annotators' corrections;
2. pre-label the held-out set with the base model, next to a random and a constant predictor;
3. round 1 on the first batch of corrections, round 2 on both batches (each gated on its validation split);
4. print mAP@0.5 and per-label AP of every version on the held-out set; write demo.json and demo.png.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from workers.events import segments_from_probabilities, window_cores
from workers.jobs import prelabel_videos
from workers.rounds.corrections import Snapshot, snapshot_from_ground_truth
from workers.rounds.evaluation import EvaluationReport, evaluate
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
    cores = window_cores([tuple(w) for w in result.windows], settings.stride_s, meta.duration)
    out: list[Segment] = []
    for label in EVENTS:
        probs = rng.uniform(0, 1, len(cores))
        out += segments_from_probabilities(
            label, cores, probs, meta.fps, meta.n_frames, settings.high, settings.low, settings.smoothing
        )
    return out


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


def _merge(a: Snapshot, b: Snapshot) -> Snapshot:
    return Snapshot(labels=a.labels, videos=a.videos + b.videos, sources=a.sources + b.sources).frozen()


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
    # line events last 1.5-7 s: 2 s windows every second, no smoothing, resolve them
    pre = PrelabelSettings(window_s=2.0, stride_s=1.0, smoothing=1)

    store = ModelStore(workdir / "store")
    init_store(store, model_name)
    _say(f"[2/4] base model ({model_name}) on the held-out set")
    rows: dict[str, EvaluationReport] = {}
    base_report, base_results = _evaluate_version(
        load_model(store.version_dir("base"), dtype="auto"), videos, gt, pre, labels
    )
    rng = np.random.default_rng(0)
    rows["random"] = evaluate({r.video: baseline_segments(r, "random", pre, rng) for r in base_results}, gt)
    rows["constant"] = evaluate(
        {r.video: baseline_segments(r, "constant", pre, rng) for r in base_results}, gt
    )
    rows["base"] = base_report

    snap1 = snapshot_from_ground_truth(workdir / "batch1" / "ground_truth.jsonl", labels)
    snap2 = _merge(snap1, snapshot_from_ground_truth(workdir / "batch2" / "ground_truth.jsonl", labels))
    train = TrainSettings() if steps is None else TrainSettings(steps=steps)
    steps = train.steps
    settings = RoundSettings(train=train, prelabel=pre)
    rounds = []
    for i, snap in enumerate((snap1, snap2), start=1):
        _say(f"[3/4] round {i}: {len(snap.videos)} corrected videos, {steps} steps (masking + MVM)")

        def show(stage: str, info: dict) -> None:
            if stage != "train" or info["step"] % 25 == 0:
                _say(f"      {stage}: {info}")

        result = run_round(store, snap, settings, progress=show)
        rounds.append(
            {
                "version": result.version,
                "promoted": result.promoted,
                "reason": result.reason,
                "timings": result.timings,
            }
        )
        _say(f"      {result.reason} -> {'promoted' if result.promoted else 'not promoted'}")
        rows[result.version], _ = _evaluate_version(
            load_model(store.version_dir(result.version), dtype="auto"), videos, gt, pre, labels
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
    summary = {
        "heldout_videos": n_heldout,
        "duration_s": duration,
        "steps_per_round": steps,
        "serving": serving,
        "rounds": rounds,
        "table": {name: rep.to_dict() for name, rep in rows.items()},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (workdir / "demo.json").write_text(json.dumps(summary, indent=2))
    _plot(
        {k: v for k, v in rows.items() if k not in ("random", "constant")} | {"random": rows["random"]},
        workdir / "demo.png",
    )
    print(f"\nwrote {workdir / 'demo.json'} and {workdir / 'demo.png'} in {summary['seconds']:.0f}s")
    return summary
