"""Peak memory of pre-labeling one video as its length grows: generated 320x180 videos at 1 fps of 10 minutes,
1 hour and 10 hours (a moving part on a belt), each pre-labeled by `stllm prelabel` in its own process
(60 s windows every 30 s, so the 10-hour video is 1,200 windows); peak RSS from the kernel.

    .venv/bin/python bench/long_video.py [--model builtin] [--minutes 10 60 600]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def write_video(path: Path, minutes: float, fps: int = 1) -> Path:
    """A long, cheap video: a bright part moving along a grey belt, one frame per second."""
    import av

    if path.exists():
        return path
    n = int(minutes * 60 * fps)
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = 320, 180, "yuv420p"
        s.options = {"preset": "ultrafast", "g": "60"}
        base = np.full((180, 320, 3), 90, np.uint8)
        for i in range(n):
            img = base.copy()
            x = (i * 7) % 300
            img[80:110, x : x + 20] = 230
            for packet in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in s.encode():
            out.mux(packet)
    return path


def peak_rss_mib(cmd: list[str], env: dict) -> tuple[float, float, int]:
    """(peak RSS of ``cmd`` in MiB, wall seconds, exit code), measured by a fresh parent for each command (the
    kernel's figure for waited children is the largest so far, not each one's)."""
    probe = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t, rc)"
    )
    out = subprocess.run([sys.executable, "-c", probe, *cmd], env=env, capture_output=True, text=True).stdout
    kib, wall, rc = out.split()
    return int(kib) / 1024, float(wall), int(rc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--minutes", type=float, nargs="+", default=[10, 60, 600])
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "stllm-long-video"))
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "STLLM_BROKER_URL": ""}
    print(f"{'video':>10} {'windows':>8} {'peak RSS':>10} {'wall':>8}")
    for minutes in args.minutes:
        video = write_video(work / f"belt-{int(minutes)}min.mp4", minutes)
        cmd = [sys.executable, "-m", "workers.cli", "prelabel", str(video), "--labels", "jam", "hand"]
        cmd += ["--model", args.model, "--window", "60", "--stride", "30"]
        rss, wall, rc = peak_rss_mib(cmd, env)
        windows = max(1, int((minutes * 60 - 60) // 30) + 1)
        print(
            f"{minutes:>7.0f} min {windows:>8} {rss:>7.0f} MiB {wall:>6.0f} s"
            + ("" if rc == 0 else f" (rc {rc})")
        )


if __name__ == "__main__":
    main()
