"""Decoding figures on a generated 10-minute 720p line video: frames sampled by seeking vs decoding
everything, and decode prefetched in a thread (overlapped with compute) vs not.

    .venv/bin/python bench/decode.py [--minutes 10] [--fps 10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import av

sys.path.insert(0, ".")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--fps", type=float, default=10.0)
    args = ap.parse_args()
    from workers.events import windows
    from workers.jobs import decode_side, decode_windows, prefetch, window_probabilities
    from workers.linevideo import LineVideoSpec, write_line_video
    from workers.schemas import parse_labels
    from workers.stllm.io import load_model
    from workers.stllm.video import read_frames, segment_times

    work = Path(tempfile.mkdtemp(prefix="stllm-decode-"))
    path = work / "long.mp4"
    t = time.perf_counter()
    write_line_video(
        path, LineVideoSpec(seed=1, duration=60 * args.minutes, fps=args.fps, width=1280, height=720)
    )
    print(
        f"generated {args.minutes:.0f} min 1280x720 at {args.fps:.0f} fps ({path.stat().st_size / 1e6:.0f} MB) "
        f"in {time.perf_counter() - t:.0f}s"
    )
    duration = 60 * args.minutes

    t = time.perf_counter()
    n = 0
    with av.open(str(path)) as c:
        c.streams.video[0].thread_type = "AUTO"
        for frame in c.decode(video=0):
            frame.to_ndarray(format="rgb24", width=448, height=252)
            n += 1
    full = time.perf_counter() - t
    print(f"decode everything ({n} frames, converted at 448 px): {full:.1f}s")
    for name, times in (
        ("16 frames over the video (ask)", segment_times(0, duration, 16)),
        ("64 frames over the video", segment_times(0, duration, 64)),
        (
            "pre-label: 4 frames per 4 s window every 2 s",
            [t for s, e in windows(duration, 4, 2) for t in segment_times(s, e, 4)],
        ),
    ):
        t = time.perf_counter()
        read_frames(path, times, max_side=448)
        took = time.perf_counter() - t
        print(
            f"sampled with seeking, {name} ({len(times)} frames): {took:.2f}s -> {full / took:.1f}x faster than full"
        )

    # overlap: several videos through pre-labeling, decode of the next prefetched vs decoded inline
    model = load_model("builtin", dtype="auto")
    labels = parse_labels(["jam", "hand", "defect"])
    clips = []
    for i in range(4):
        p = work / f"clip{i}.mp4"
        write_line_video(p, LineVideoSpec(seed=10 + i, duration=60, fps=25, width=1280, height=720))
        clips.append(str(p))
    qs = [x.question() for x in labels]

    def decode(p):
        return decode_windows(p, 4.0, 2.0, 4, 16, decode_side(model))

    decode(clips[0])
    t = time.perf_counter()
    dec = comp = 0.0
    for p in clips:
        a = time.perf_counter()
        d = decode(p)
        b = time.perf_counter()
        window_probabilities(model, d, qs, 32)
        dec, comp = dec + b - a, comp + time.perf_counter() - b
    serial = time.perf_counter() - t
    t = time.perf_counter()
    for _, d in prefetch(clips, decode):
        window_probabilities(model, d, qs, 32)
    overlapped = time.perf_counter() - t
    print(
        f"4 x 60 s 720p/25 fps videos: serial {serial:.1f}s (decode {dec:.1f}s + compute {comp:.1f}s); "
        f"prefetched {overlapped:.1f}s; time waiting on decode with prefetch ~{max(0.0, overlapped - comp):.1f}s"
    )
    print("\ncommand: .venv/bin/python bench/decode.py")


if __name__ == "__main__":
    main()
