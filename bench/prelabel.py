"""Pre-label throughput of the builtin model on 60 s line videos, with the time split between decoding,
vision encoding and LLM scoring; then mAP@0.5 of the untrained builtin model vs a random and a constant
predictor on generated videos.

    .venv/bin/python bench/prelabel.py [--videos 4] [--map-videos 50] [--dtype auto]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from workers.jobs import (  # noqa: E402
    decode_side,
    decode_windows,
    prefetch,
    prelabel_videos,
    window_probabilities,
)
from workers.rounds.evaluation import evaluate  # noqa: E402
from workers.schemas import (  # noqa: E402
    PrelabelSettings,
    Segment,  # noqa: E402
    parse_labels,
)
from workers.stllm.io import load_model  # noqa: E402
from workers.tools.demo import baseline_segments  # noqa: E402
from workers.tools.linevideo import EVENT_DESCRIPTIONS, generate_dataset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=4, help="60 s videos for the throughput run")
    ap.add_argument("--map-videos", type=int, default=50, help="videos for the mAP comparison (0 to skip)")
    ap.add_argument("--clips", type=int, default=16, help="8 s clips for the cross-video batching run")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="stllm-bench-"))
    records = generate_dataset(work / "v60", args.videos, seed=500, duration=60.0)
    paths = [r["video"] for r in records]
    model = load_model("builtin", dtype=args.dtype).inference_weights()  # as workers serve it
    labels = parse_labels([f"{k}: {v}" for k, v in EVENT_DESCRIPTIONS.items()])
    s = PrelabelSettings().resolved()
    print(
        f"builtin, compute {str(model.compute_dtype).split('.')[-1]}, {torch.get_num_threads()} threads, "
        f"{len(labels)} labels, window {s.window_s}s stride {s.stride_s}s, {s.frames_per_window} frames/window, "
        f"{s.global_frames} global frames"
    )

    prelabel_videos(model, paths[:1], labels, s)  # warm-up
    t = time.perf_counter()
    results = prelabel_videos(model, paths, labels, s)
    wall = time.perf_counter() - t
    n_windows = sum(len(r.windows) for r in results)
    print(
        f"end to end (decode prefetched in a thread): {len(paths)} x 60 s videos in {wall:.2f}s -> "
        f"{n_windows / wall:.1f} windows/s, {60 * len(paths) / wall:.1f} videos/min, "
        f"{60 * len(paths) / wall:.0f}x real time"
    )

    # the same work stage by stage, serially, to see where the time goes
    decode = vision = llm = 0.0
    for p in paths:
        t0 = time.perf_counter()
        d = decode_windows(
            p, s.window_s, s.stride_s, s.frames_per_window, s.global_frames, decode_side(model)
        )
        t1 = time.perf_counter()
        features = model.frame_features(d.frames)
        t2 = time.perf_counter()
        window_probabilities(model, d, [label.question() for label in labels], s.window_batch, features)
        t3 = time.perf_counter()
        decode, vision, llm = decode + t1 - t0, vision + t2 - t1, llm + t3 - t2
    total = decode + vision + llm
    print(
        f"time split (serial): decode {decode:.2f}s ({100 * decode / total:.0f}%), vision {vision:.2f}s "
        f"({100 * vision / total:.0f}%), LLM scoring {llm:.2f}s ({100 * llm / total:.0f}%)"
    )

    # short clips (a few windows each): one video per LLM batch vs windows batched across videos
    clips = [r["video"] for r in generate_dataset(work / "clips", args.clips, seed=700, duration=8.0)]
    questions = [label.question() for label in labels]

    def decode_clip(path: str):
        return decode_windows(
            path, s.window_s, s.stride_s, s.frames_per_window, s.global_frames, decode_side(model)
        )

    t = time.perf_counter()
    for _, d in prefetch(clips, decode_clip):  # the same prefetching loop, one video per LLM batch
        window_probabilities(model, d, questions, s.window_batch)
    alone = time.perf_counter() - t
    t = time.perf_counter()
    prelabel_videos(model, clips, labels, s)
    together = time.perf_counter() - t
    print(
        f"{len(clips)} x 8 s clips: one video per batch {alone:.2f}s, windows batched across videos "
        f"{together:.2f}s ({alone / together:.2f}x)"
    )

    if args.map_videos:
        import numpy as np

        recs = generate_dataset(work / "map", args.map_videos, seed=1000, duration=30.0)
        gt = {r["video"]: [Segment.model_validate(x) for x in r["segments"]] for r in recs}
        results = prelabel_videos(model, list(gt), labels, s)
        rng = np.random.default_rng(0)
        rows = {
            "builtin (untrained)": evaluate(
                {r.video: [Segment.model_validate(x) for x in r.segments] for r in results}, gt
            ),
            "random": evaluate({r.video: baseline_segments(r, "random", s, rng) for r in results}, gt),
            "constant": evaluate({r.video: baseline_segments(r, "constant", s, rng) for r in results}, gt),
        }
        print(f"\nmAP on {args.map_videos} generated 30 s videos")
        for name, rep in rows.items():
            print(f"  {name:<20} mAP@0.5 {rep.map_at(0.5):.3f}   mAP(0.3-0.7) {rep.mean_ap:.3f}")
    print("\ncommand: .venv/bin/python " + shlex.join(sys.argv))


if __name__ == "__main__":
    main()
