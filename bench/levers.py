"""The loop's levers, one at a time, on the demo's data (or the second event set's: ``--set scenes``): each
variant trains round 1 (or round 2) from cached encoder features and is measured on the set's held-out videos,
so a lever costs a training run, not a demo.

    .venv/bin/python bench/levers.py [--set line|scenes] [--round 1] [--seeds 0 1 2] [--variants default ...]
                                     [--cuts]

Per variant and seed: held-out mAP@0.5 with the thresholds a round would choose on its validation videos,
per-label AP@0.5 / window ROC-AUC, and the training time; then mean ± sd over the seeds. ``--cuts`` measures
each model at other threshold rules too, on the same scores (``name @rule`` rows). Variants (each a
TrainSettings, builtin spec or STLLMConfig change against the product's defaults):

    default        the product's defaults (masking + MVM, all questions per window)
    masking_only   masking without the MVM loss             no_masking   neither
    one_question   one question per sequence, in pairs (the earlier recipe)
    no_motion      the connector without each token's change since the previous frame
    signed_motion  the signed change instead of its absolute value (the earlier input)
    raw_input      the connector reads the encoder's features as they are (not standardised, InputStandardizer)
    grid3          3 x 3 tokens per frame instead of 2 x 2
    avgmax         each token the mean and the maximum of its cell's features (the default: the mean)
    lora_qv        LoRA on q and v only (the earlier targets)
    batch8         8 windows a step instead of 4          steps200     twice the steps
    lr2e-3         the earlier learning rate (twice the default 1e-3)
    lr5e-4         half the default
    lora_dropout   dropout 0.05 on the adapters' input (the earlier setting; the default is none)
    hard_targets   only windows clearly yes or no train (the earlier recipe; the default trains a partly
                   covered window toward its covered share)

``--round 2`` trains as the product does: round 1 on batch 1, then round 2 on batches 1 and 2 from round 1's
model (``train_from="serving"``), both at the variant's settings; the table shows both rounds. ``--fresh``
trains round 2 from the base model instead (``train_from="base"``). ``--round 2 --continue-only`` trains
round 1 at the defaults (once per seed, shared by the variants) and only round 2 at the variant's settings: the
levers of continuing a served version (TrainSettings variants only).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

# name -> (TrainSettings changes, builtin spec changes, STLLMConfig changes)
VARIANTS: dict[str, tuple[dict, dict, dict]] = {
    "default": ({}, {}, {}),
    "masking_only": ({"mvm": False}, {}, {}),
    "no_masking": ({"masking": False, "mvm": False}, {}, {}),
    "one_question": ({"all_questions": False, "batch_size": 8}, {}, {}),
    "no_motion": ({}, {"motion": False}, {}),
    "signed_motion": ({}, {"motion": True}, {}),
    "raw_input": ({}, {"standardize": False}, {}),
    "grid3": ({}, {"grid": 3}, {}),
    "avgmax": ({}, {"pool": "avgmax"}, {}),
    "lora_qv": ({}, {}, {"lora_targets": ["q_proj", "v_proj"]}),
    "batch8": ({"batch_size": 8}, {}, {}),
    "steps200": ({"steps": 200}, {}, {}),
    "lr2e-3": ({"lr": 2e-3}, {}, {}),
    "lr5e-4": ({"lr": 5e-4}, {}, {}),
    "lora_dropout": ({}, {}, {"lora_dropout": 0.05}),
    "hard_targets": ({"soft_targets": False}, {}, {}),
}


def event_data(name: str, work: Path):
    """(labels, {"heldout", "batch1", "batch2"} snapshots) of an event set, generated once under ``work``.
    line: the demo's sets (held-out 12, two batches of 16 corrected 30 s line videos). scenes: the second
    event set as bench/scenes.py makes it (held-out 6, a batch of 12; batch 2 another 12)."""
    from workers.rounds.corrections import snapshot_from_ground_truth
    from workers.schemas import parse_labels

    if name == "line":
        from workers.tools.linevideo import EVENT_DESCRIPTIONS as desc
        from workers.tools.linevideo import generate_dataset

        def make(d, n, seed):
            return generate_dataset(d, n, seed=seed, duration=30.0)

        plan = {"heldout": (12, 1000), "batch1": (16, 2000), "batch2": (16, 3000)}
    else:
        from workers.tools.scenevideo import SCENE_DESCRIPTIONS as desc
        from workers.tools.scenevideo import generate_scene_dataset

        def make(d, n, seed):
            return generate_scene_dataset(d, n, seed=seed)

        plan = {"heldout": (6, 900), "batch1": (12, 901), "batch2": (12, 903)}
    labels = parse_labels([f"{k}: {v}" for k, v in desc.items()])
    out = {}
    for part, (n, seed) in plan.items():
        d = work / ("" if name == "line" else name) / part
        if not (d / "ground_truth.jsonl").exists():
            make(d, n, seed)
        out[part] = snapshot_from_ground_truth(d / "ground_truth.jsonl", labels)
    return labels, out


def _show(variant: str, seed: int, m, names: list[str]) -> None:
    print(
        f"{variant:<16} seed {seed}  mAP@0.5 {m.map50:.3f}  "
        + "  ".join(f"{n[:6]} {m.per_label.get(n, 0):.2f}/{m.auc[n] or 0:.2f}" for n in names)
        + f"  train {m.train_s:.0f} s",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="line", choices=("line", "scenes"), help="line: the demo's; scenes")
    ap.add_argument("--round", type=int, default=1, choices=(1, 2), help="1: batch 1; 2: batches 1 and 2")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+", default=["default"], choices=list(VARIANTS))
    ap.add_argument("--fresh", action="store_true", help="round 2 from the base model, not from round 1")
    ap.add_argument(
        "--continue-only",
        action="store_true",
        help="round 2: round 1 at the defaults, only round 2 at the variant's TrainSettings",
    )
    ap.add_argument(
        "--cuts",
        action="store_true",
        help="measure each model at every threshold rule too: tuned (a round's), smooth1 / smooth2 (the mean"
        " AP of each threshold and its 1 / 2 neighbours either side), at0.5 (0.5 for every label)",
    )
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "stllm-levers")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from lab import Lab, mean_sd

    from workers.rounds.corrections import accumulate, choose_windows

    labels, sets = event_data(args.set, args.work)
    snap = sets["batch1"] if args.round == 1 else accumulate(sets["batch1"], sets["batch2"])
    windows = choose_windows(snap)
    lab = Lab(args.work, labels, windows, cuts=args.cuts)
    print(
        f"{args.set}, round {args.round}: {len(snap.videos)} corrected videos, windows {windows}", flush=True
    )
    if args.continue_only and (args.round != 2 or args.fresh):
        ap.error("--continue-only is for --round 2 without --fresh")
    results: dict[str, list] = {}
    shared_r1: dict[int, Path] = {}  # seed -> round 1 at the defaults (--continue-only)

    def record(name: str, seed: int, model, base: Path, thresholds: dict, train_s: float) -> None:
        cuts = lab.cuts or {"": thresholds}
        for cut, m in lab.measure_cuts(model, base, sets["heldout"], cuts, train_s).items():
            key = f"{name} @{cut}" if cut else name
            results.setdefault(key, []).append(m)
            _show(key, seed, m, lab.names)

    for variant in args.variants:
        train_changes, spec_changes, config_changes = VARIANTS[variant]
        if args.continue_only and (spec_changes or config_changes):
            ap.error(f"--continue-only varies round 2's TrainSettings only; {variant} changes the model")
        base = lab.base(spec_changes, config_changes)
        for seed in args.seeds:
            start = base
            if args.continue_only and seed in shared_r1:
                start = shared_r1[seed]
            elif args.round == 2 and not args.fresh:  # round 1 first, as the product's round 2 starts from it
                r1_changes = {} if args.continue_only else train_changes
                model, thresholds, train_s, start = lab.train(sets["batch1"], base, r1_changes, seed, True)
                r1_name = "default r1" if args.continue_only else f"{variant} r1"
                record(r1_name, seed, model, base, thresholds, train_s)
                if args.continue_only:
                    shared_r1[seed] = start
            model, thresholds, train_s = lab.train(snap, start, train_changes, seed)
            record(variant, seed, model, base, thresholds, train_s)
    print("\nheld-out mAP@0.5, mean ± sd over seeds (per label: AP@0.5 mean / window ROC-AUC mean):")
    for variant, ms in results.items():
        per = "  ".join(
            f"{n[:6]} {sum(m.per_label.get(n, 0) for m in ms) / len(ms):.2f}/"
            f"{sum(m.auc[n] or 0 for m in ms) / len(ms):.2f}"
            for n in lab.names
        )
        print(
            f"  {variant:<16} {mean_sd([m.map50 for m in ms])}  {per}  [{', '.join(f'{m.map50:.3f}' for m in ms)}]"
        )
    print(f"\ncommand: .venv/bin/python bench/levers.py {shlex.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
