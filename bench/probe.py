"""What the frozen encoder carries: per label, a linear probe on each window's encoder features, trained on
the same windows and yes/no targets a round trains on, and its window ROC-AUC on the held-out videos.

    .venv/bin/python bench/probe.py [--set line|scenes] [--l2 1e-2]

A label whose probe AUC is high but whose round AUC (bench/levers.py) is low is lost in the LLM's training,
not in the encoder; a label whose probe is low is not in the frozen features at these windows at all. The
window vector: the frames' mean token (mean over frames, its max over frames, and its mean absolute change
from frame to frame), standardised; logistic regression with an L2 penalty, full batch (LBFGS).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path


def window_vectors(feats):
    """(W, 3 Dv) tensor: per window, the frames' mean token: mean over frames, max over frames, mean |change|."""
    import torch

    x = feats.windows.float().mean(2)  # (W, F, Dv)
    change = (x[:, 1:] - x[:, :-1]).abs().mean(1) if x.shape[1] > 1 else torch.zeros_like(x[:, 0])
    return torch.cat([x.mean(1), x.amax(1), change], -1)


def probe_auc(train_x, train_y, test_x, test_y, l2: float) -> float | None:
    """Held-out ROC-AUC of an L2 logistic regression (None where the held-out windows have one class)."""
    import torch

    from workers.rounds.evaluation import roc_auc

    if len(set(test_y.tolist())) < 2 or len(set(train_y.tolist())) < 2:
        return None
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    w = torch.zeros(a.shape[1], requires_grad=True)
    c = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, c], max_iter=200, line_search_fn="strong_wolfe")
    pos = float(train_y.mean())
    weight = torch.where(train_y > 0, 0.5 / pos, 0.5 / (1 - pos))  # balanced, as rounds draw yes and no

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(a @ w + c, train_y, weight=weight)
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return roc_auc((b @ w + c).tolist(), (test_y > 0).tolist())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="line", choices=("line", "scenes"))
    ap.add_argument("--l2", type=float, default=1e-2)
    ap.add_argument("--window", type=float, default=None, help="window length in s (default: the round's)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "stllm-levers")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from lab import Lab
    from levers import event_data

    from workers.rounds.corrections import choose_windows
    from workers.rounds.run import window_examples
    from workers.schemas import RoundSettings, TrainSettings

    labels, sets = event_data(args.set, args.work)
    snap, heldout = sets["batch1"], sets["heldout"]
    windows = choose_windows(snap)
    if args.window:
        windows = {"window_s": args.window, "stride_s": args.window / 2}
    lab = Lab(args.work, labels, windows)
    base = lab.base()
    s = RoundSettings(prelabel=lab.p, train=TrainSettings(soft_targets=False))  # clear windows only

    def table(snapshot):
        by_id = {v.video_id: v for v in snapshot.videos}
        ids = list(by_id)
        vecs = {i: window_vectors(lab.features(base, by_id[i])[1]) for i in ids}
        rows: dict[str, tuple[list, list]] = {}
        for vid, w, q, a, _ in window_examples(snapshot, ids, s):
            xs, ys = rows.setdefault(q, ([], []))
            xs.append(vecs[vid][w])
            ys.append(1.0 if a == "yes" else 0.0)
        return {q: (torch.stack(xs), torch.tensor(ys)) for q, (xs, ys) in rows.items()}

    train, test = table(snap), table(heldout)
    print(
        f"{args.set}: {len(snap.videos)} corrected, {len(heldout.videos)} held-out videos, windows {windows}"
    )
    print(f"{'label':<14}{'yes/no (train)':>16}{'probe AUC':>11}")
    for label in labels:
        q = label.question()
        if q not in train or q not in test:
            print(f"{label.name:<14}{'-':>16}{'-':>11}")
            continue
        auc = probe_auc(*train[q], *test[q], args.l2)
        n_yes = int(train[q][1].sum())
        print(
            f"{label.name:<14}{f'{n_yes}/{len(train[q][1]) - n_yes}':>16}"
            f"{auc if auc is not None else float('nan'):>11.3f}"
        )
    print(f"\ncommand: .venv/bin/python bench/probe.py {shlex.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
