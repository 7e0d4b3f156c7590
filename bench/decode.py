"""Decoding figures on a generated 10-minute 720p line video: frames sampled by seeking vs decoding
everything, and decode prefetched in a thread (overlapped with compute) vs not.

    .venv/bin/python bench/decode.py [--minutes 10] [--fps 10]
    .venv/bin/python bench/decode.py --overlap-only --model smolvlm2-256m-shaped

The overlap part reports the time the compute loop spends blocked on the next decoded video: the first
video has nothing to overlap with; after it, at steady state, that time should be zero.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import av


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--fps", type=float, default=10.0)
    ap.add_argument("--model", default="builtin", help="builtin, smolvlm2-256m-shaped, or any --model")
    ap.add_argument("--overlap-only", action="store_true", help="skip the seek vs full decode part")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="stllm-decode-"))
    if not args.overlap_only:
        sampling(work, args.minutes, args.fps)
    overlap(work, args.model)
    print("\ncommand: .venv/bin/python " + shlex.join(sys.argv))


def sampling(work: Path, minutes: float, fps: float) -> None:
    from workers.events import windows
    from workers.stllm.video import read_frames, segment_times
    from workers.tools.linevideo import LineVideoSpec, write_line_video

    path = work / "long.mp4"
    t = time.perf_counter()
    write_line_video(path, LineVideoSpec(seed=1, duration=60 * minutes, fps=fps, width=1280, height=720))
    print(
        f"generated {minutes:.0f} min 1280x720 at {fps:.0f} fps ({path.stat().st_size / 1e6:.0f} MB) "
        f"in {time.perf_counter() - t:.0f}s"
    )
    duration = 60 * minutes

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


def overlap(work: Path, model_name: str) -> None:
    """Several videos through pre-labeling, the next one's decode prefetched in a thread vs inline."""
    from workers.jobs import decode_side, decode_windows, prefetch, window_probabilities
    from workers.schemas import parse_labels
    from workers.stllm.io import build_model, load_model
    from workers.tools.linevideo import LineVideoSpec, write_line_video

    if model_name == "smolvlm2-256m-shaped":
        from common import SMOLVLM2_256M, build

        model = build_model(build(SMOLVLM2_256M, work / "model"), dtype="auto")
    else:
        model = load_model(model_name, dtype="auto")
    model.eval().inference_weights()
    labels = parse_labels(["jam", "hand", "defect"])
    clips = []
    for i in range(4):
        p = work / f"clip{i}.mp4"
        write_line_video(p, LineVideoSpec(seed=10 + i, duration=60, fps=25, width=1280, height=720))
        clips.append(str(p))
    qs = [x.question() for x in labels]

    def decode(p):
        return decode_windows(p, 4.0, 2.0, 4, 16, decode_side(model))

    window_probabilities(model, decode(clips[0]), qs, 32)  # warm-up
    t = time.perf_counter()
    dec = comp = 0.0
    for p in clips:
        a = time.perf_counter()
        d = decode(p)
        b = time.perf_counter()
        window_probabilities(model, d, qs, 32)
        dec, comp = dec + b - a, comp + time.perf_counter() - b
    serial = time.perf_counter() - t

    def prefetched(low_priority: bool) -> tuple[float, list[float]]:
        waits = []
        t = time.perf_counter()
        items = prefetch(clips, decode, low_priority=low_priority)
        for _ in clips:
            a = time.perf_counter()
            _, d = next(items)
            waits.append(time.perf_counter() - a)
            window_probabilities(model, d, qs, 32)
        return time.perf_counter() - t, waits

    print(
        f"{len(clips)} x 60 s 720p/25 fps videos, {model_name}: serial {serial:.1f}s (decode {dec:.1f}s + "
        f"compute {comp:.1f}s)"
    )
    for low, name in ((False, "prefetched"), (True, "prefetched at low priority (the default on a CPU)")):
        total, waits = prefetched(low)
        print(
            f"  {name}: {total:.1f}s; compute blocked on decode: first video {waits[0]:.2f}s (nothing to "
            f"overlap yet), then {sum(waits[1:]):.2f}s over the other {len(clips) - 1}"
        )


if __name__ == "__main__":
    main()
