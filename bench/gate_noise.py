"""How steady each gate statistic is on a few validation videos, on a finished ``make demo``'s versions.

Round-1 and round-2 pre-label round 2's validation videos and the held-out set (as they serve: their own
windows and thresholds). Printed for each set: mAP@0.5, mAP (tIoU 0.3-0.7), the fall in window error
(workers.rounds.gate.window_error, ``gate_on="windows"``) and the rise in window ROC-AUC (the default gate's),
with their bootstrap intervals, and on the validation videos what each gate decides; then, over random draws
of as many videos as the validation split has from all of them, how often each statistic's round-2 minus
round-1 difference has the opposite sign to its value on all the videos, and its spread.

    .venv/bin/python bench/gate_noise.py [--workdir .stllm-demo] [--draws 300]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=".stllm-demo", help="a finished `stllm demo`'s folder")
    ap.add_argument("--draws", type=int, default=300)
    args = ap.parse_args()
    from workers.jobs import prelabel_videos
    from workers.rounds.corrections import load_snapshot, split_ids, video_key
    from workers.rounds.evaluation import evaluate
    from workers.rounds.gate import (
        bootstrap_auc_gain,
        bootstrap_gain,
        bootstrap_overlap_gain,
        bootstrap_window_gain,
        decide,
        timeline_overlap_terms,
        window_error,
        window_error_terms,
        window_ranking_parts,
    )
    from workers.rounds.registry import ModelStore
    from workers.schemas import PrelabelSettings, RoundSettings, Segment
    from workers.stllm.io import load_model

    work = Path(args.workdir)
    store = ModelStore(work / "store")
    record = store.read()["versions"]["round-2"]
    snap = load_snapshot(store.root / record["snapshot_path"])
    settings = RoundSettings.model_validate(record["settings"])
    files = {v.video_id: video_key(v.video) for v in snap.videos}
    _, val = split_ids(
        list(files),
        settings.validation_fraction,
        group=files.__getitem__,
        min_validation=settings.min_validation,
    )
    by_id = {v.video_id: v for v in snap.videos}
    truth = {by_id[i].video: by_id[i].segments for i in val}
    rows = [json.loads(line) for line in (work / "heldout" / "ground_truth.jsonl").read_text().splitlines()]
    heldout = {r["video"]: [Segment.model_validate(s) for s in r["segments"]] for r in rows}
    labels = [x.name for x in snap.labels]
    sets = {"validation": list(truth), "held-out": list(heldout)}
    truth |= heldout
    segs, terms, ranks, spans = {}, {}, {}, {}
    for name in ("round-1", "round-2"):
        model = load_model(store.version_dir(name), dtype="auto")
        results = prelabel_videos(model, list(truth), snap.labels, PrelabelSettings())
        segs[name] = {r.video: [Segment.model_validate(s) for s in r.segments] for r in results}
        terms[name] = {r.video: window_error_terms(r, truth[r.video], labels) for r in results}
        ranks[name] = {r.video: window_ranking_parts(r, truth[r.video], labels) for r in results}
        spans[name] = {v: timeline_overlap_terms(segs[name][v], truth[v], labels) for v in segs[name]}
        print(f"pre-labeled {len(results)} videos with {name}", file=sys.stderr, flush=True)

    def paired(
        bootstrap, parts: dict, videos: list[str], resamples: int = settings.resamples
    ) -> tuple[float, tuple[float, float], dict]:
        """round-2 minus round-1 on these videos by ``bootstrap`` (a workers.rounds.gate bootstrap_*_gain) over
        each version's per-video ``parts``: the gain, its interval and per-label intervals."""
        return bootstrap(
            {v: parts["round-2"][v] for v in videos},
            {v: parts["round-1"][v] for v in videos},
            resamples,
            settings.confidence,
            settings.train.seed,
            labels,
        )

    def auc(
        videos: list[str], resamples: int = settings.resamples
    ) -> tuple[float, tuple[float, float], dict]:
        """The window ROC-AUC rise."""
        return paired(bootstrap_auc_gain, ranks, videos, resamples)

    def overlap(
        videos: list[str], resamples: int = settings.resamples
    ) -> tuple[float, tuple[float, float], dict]:
        """The timeline IoU rise."""
        return paired(bootstrap_overlap_gain, spans, videos, resamples)

    def stats(videos: list[str]) -> np.ndarray:
        """round-2 minus round-1: mAP@0.5, mAP, the fall in window error and the rise in window ROC-AUC (all:
        positive = round-2 better)."""
        gt = {v: truth[v] for v in videos}
        r1 = evaluate({v: segs["round-1"][v] for v in videos}, gt)
        r2 = evaluate({v: segs["round-2"][v] for v in videos}, gt)
        err = {n: window_error({v: terms[n][v] for v in videos}) for n in terms}
        rise = auc(videos, 10)[0]  # the point estimates; few resamples
        iou = overlap(videos, 10)[0]
        return np.array(
            [
                r2.map_at(0.5) - r1.map_at(0.5),
                r2.mean_ap - r1.mean_ap,
                err["round-1"] - err["round-2"],
                rise,
                iou,
            ]
        )

    print(
        f"\n{'videos':<12}{'n':>3}   round-2 minus round-1: mAP@0.5    mAP   window error fall [90% interval]"
        "   window AUC rise [90% interval]   timeline IoU rise [90% interval]"
    )
    for name, videos in [*sets.items(), ("all", list(truth))]:
        d = stats(videos)
        gain, (lo, hi), per_label = bootstrap_window_gain(
            {v: terms["round-2"][v] for v in videos},
            {v: terms["round-1"][v] for v in videos},
            settings.resamples,
            settings.confidence,
            settings.train.seed,
            labels,
        )
        rise, (alo, ahi), auc_labels = auc(videos)
        iou, (ilo, ihi), iou_labels = overlap(videos)
        print(
            f"{name:<12}{len(videos):>3}   {d[0]:>+30.3f} {d[1]:>+6.3f}   {gain:>+.4f} [{lo:+.4f}, {hi:+.4f}]"
            f"   {rise:>+.4f} [{alo:+.4f}, {ahi:+.4f}]   {iou:>+.4f} [{ilo:+.4f}, {ihi:+.4f}]"
        )
        gt = {v: truth[v] for v in videos}
        ap = {n: evaluate({v: segs[n][v] for v in videos}, gt, labels=labels).to_dict() for n in segs}
        for label in labels:
            a1, a2 = ap["round-1"]["per_label_AP@0.5"][label], ap["round-2"]["per_label_AP@0.5"][label]
            w, r, o = per_label[label], auc_labels[label], iou_labels[label]
            print(
                f"{'':<16}{label:<14} AP@0.5 {a1:.2f} -> {a2:.2f}   its window error fall [{w[0]:+.4f}, "
                f"{w[1]:+.4f}], AUC rise [{r[0]:+.4f}, {r[1]:+.4f}], IoU rise [{o[0]:+.4f}, {o[1]:+.4f}]"
            )
        if name == "validation":
            map_gain, map_interval = bootstrap_gain(
                {v: segs["round-2"][v] for v in videos},
                {v: segs["round-1"][v] for v in videos},
                gt,
                labels,
                settings.resamples,
                settings.confidence,
                settings.train.seed,
            )
            for on, intervals, g, i in (
                ("timeline", iou_labels, iou, (ilo, ihi)),
                ("ranking", auc_labels, rise, (alo, ahi)),
                ("windows", per_label, gain, (lo, hi)),
            ):
                gate = decide(
                    "round-2",
                    "round-1",
                    ap["round-2"]["per_label_AP@0.5"],
                    ap["round-1"]["per_label_AP@0.5"],
                    map_gain,
                    map_interval,
                    settings.margin,
                    settings.label_drop,
                    label_intervals=intervals,
                    window_gain=g,
                    window_interval=i,
                    statistic=on,
                )
                print(f"{'':<16}gating on {on}: {gate.reason} -> promote: {gate.promote}")
    everything = list(truth)
    sign = np.sign(stats(everything))
    rng = np.random.default_rng(0)
    draws = np.array(
        [stats(list(rng.choice(everything, len(val), replace=False))) for _ in range(args.draws)]
    )
    wrong = (np.sign(draws) != sign).mean(0)
    print(
        f"\n{args.draws} random draws of {len(val)} of the {len(everything)} videos: opposite sign to all videos' "
        f"difference in {wrong[0]:.0%} (mAP@0.5), {wrong[1]:.0%} (mAP), {wrong[2]:.0%} (window error), "
        f"{wrong[3]:.0%} (window AUC), {wrong[4]:.0%} (timeline IoU); sd {draws[:, 0].std():.3f} / "
        f"{draws[:, 1].std():.3f} / {draws[:, 2].std():.4f} / {draws[:, 3].std():.4f} / {draws[:, 4].std():.4f}"
    )
    print(f"command: .venv/bin/python bench/gate_noise.py --workdir {args.workdir} --draws {args.draws}")


if __name__ == "__main__":
    main()
