"""``stllm demo``: generated line videos -> pre-labels from the builtin model -> mAP against ground truth,
next to a random and a constant predictor on the same windows. Prints a table, writes JSON."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from workers.evaluation import evaluate
from workers.events import Segment, segments_from_probabilities
from workers.jobs import _window_cores, prelabel_videos
from workers.linevideo import EVENT_DESCRIPTIONS, EVENTS, generate_dataset
from workers.schemas import PrelabelResult, PrelabelSettings, parse_labels


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
    cores = _window_cores([tuple(w) for w in result.windows], settings.stride_s, meta.duration)
    out: list[Segment] = []
    for label in EVENTS:
        probs = rng.uniform(0, 1, len(cores))
        out += segments_from_probabilities(
            label, cores, probs, meta.fps, meta.n_frames, settings.high, settings.low, settings.smoothing
        )
    return out


def run_demo(workdir: Path, n_videos: int = 12, duration: float = 30.0, model_name: str = "builtin") -> dict:
    from workers.stllm.io import load_model

    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"[1/3] generating {n_videos} line videos of {duration:.0f}s in {workdir}/videos", file=sys.stderr)
    records = generate_dataset(workdir / "videos", n_videos, seed=1000, duration=duration)
    gt = {r["video"]: [Segment.from_dict(s) for s in r["segments"]] for r in records}

    print(f"[2/3] pre-labeling with {model_name}", file=sys.stderr)
    model = load_model(model_name, dtype="auto")
    labels = parse_labels([f"{k}: {v}" for k, v in EVENT_DESCRIPTIONS.items()])
    settings = PrelabelSettings()
    from tqdm import tqdm

    with tqdm(total=n_videos, desc="pre-label", unit="video", file=sys.stderr) as bar:
        results = prelabel_videos(model, list(gt), labels, settings, progress=lambda _: bar.update(1))
    with open(workdir / "prelabels.jsonl", "w") as f:
        for r in results:
            f.write(r.model_dump_json() + "\n")

    print("[3/3] evaluating against ground truth", file=sys.stderr)
    rng = np.random.default_rng(0)
    rows = {
        model.version: evaluate({r.video: [Segment.from_dict(s) for s in r.segments] for r in results}, gt),
        "random": evaluate({r.video: baseline_segments(r, "random", settings, rng) for r in results}, gt),
        "constant": evaluate({r.video: baseline_segments(r, "constant", settings, rng) for r in results}, gt),
    }
    table = {name: rep.to_dict() for name, rep in rows.items()}
    header = f"{'predictor':<16}{'mAP@0.5':>9}{'mAP':>8}  " + "".join(f"{e[:10]:>11}" for e in EVENTS)
    print("\nheld-out line videos: AP@0.5 per label\n" + header)
    for name, rep in rows.items():
        per = rep.per_label(0.5)
        print(
            f"{name:<16}{rep.map_at(0.5):>9.3f}{rep.mean_ap:>8.3f}  "
            + "".join(f"{per.get(e, 0):>11.3f}" for e in EVENTS)
        )
    summary = {
        "videos": n_videos,
        "duration_s": duration,
        "seconds": round(time.perf_counter() - t0, 1),
        "table": table,
    }
    (workdir / "demo.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {workdir / 'demo.json'} ({summary['seconds']}s)")
    return summary
