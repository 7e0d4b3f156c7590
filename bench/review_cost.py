"""What the review numbers cost next to pre-labeling: the window, segment, label and video uncertainties of
workers.review are computed from window probabilities pre-labeling already has, so their cost is a few array
operations per video. This times them on the windows of videos from 1 minute to 10 hours (1 s stride, 5
labels, probabilities drawn at random) and puts them beside pre-labeling time at a given speed.

    .venv/bin/python bench/review_cost.py [--realtime 50]

``--realtime``: pre-labeling speed as a multiple of real time (bench/prelabel.py measures it: about 50x for
the builtin model on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--realtime", type=float, default=50.0)
    args = ap.parse_args()
    from workers.events import segments_from_probabilities
    from workers.review import video_uncertainty

    labels = ["part_passing", "jam", "defect", "empty_line", "hand"]
    rng = np.random.default_rng(0)
    print(
        f"{'video':>8}{'windows':>9}{'segments, each with u':>23}{'video numbers':>15}{'pre-label':>12}{'overhead':>10}"
    )
    for seconds in (60, 600, 3600, 36000):
        n = seconds  # one window a second
        spans = [(float(i), i + 2.0) for i in range(n)]
        probs = {label: np.clip(rng.normal(0.3, 0.3, n), 0, 1).tolist() for label in labels}
        t = time.perf_counter()
        for label in labels:
            segments_from_probabilities(label, spans, np.asarray(probs[label]), 10.0, 10 * n, high=0.5)
        total = time.perf_counter() - t
        t = time.perf_counter()
        video_uncertainty(probs, lambda label: 0.5)
        review = time.perf_counter() - t
        prelabel = seconds / args.realtime
        print(
            f"{seconds / 60:>7.0f}m{n:>9}{total * 1e3:>20.1f} ms{review * 1e3:>12.1f} ms{prelabel:>10.1f} s"
            f"{100 * review / prelabel:>9.3f}%"
        )
    print(f"\ncommand: .venv/bin/python bench/review_cost.py {shlex.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
