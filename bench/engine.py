"""Engine figures: visual tokens with and without global-local, training step time with masking+MVM /
masking only / no masking, shared-prefix vs naive scoring of 8 candidates, and the label questions' shared start
forwarded once per window vs once per question.

    .venv/bin/python bench/engine.py [--skip-builtin]
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import statistics
import sys
import tempfile
import time

import torch

from workers.stllm.io import build_model  # noqa: E402
from workers.stllm.model import IGNORE  # noqa: E402
from workers.stllm.testing import score_naive, tiny_composed  # noqa: E402


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def token_counts(k: int) -> dict[str, int]:
    return {"16 frames": 16 * k, "64 frames, all tokens": 64 * k, "64 frames via global-local": 16 * k}


def training_batch(model, batch: int, frames: int, feat_dim: int, k: int):
    feats = torch.randn(batch, frames, k, feat_dim)
    prompt = model.question_ids("Does this clip show a jam? Answer yes or no.")
    answer = model.text_ids("yes")
    ids = torch.tensor([prompt + answer] * batch)
    labels = torch.tensor([[IGNORE] * len(prompt) + answer] * batch)
    return feats, ids, labels, torch.ones_like(ids)


def train_step(model, opt, feats, gfeats, ids, labels, mask, masking: bool, mvm: bool) -> None:
    out = model.training_loss(model.video_tokens(feats, gfeats), ids, labels, mask, masking=masking, mvm=mvm)
    opt.zero_grad()
    out["loss"].backward()
    opt.step()


def bench_training(model, name: str, feat_dim: int, k: int, repeat: int, batch: int = 4) -> None:
    model.attach_lora()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for frames, n_global in ((16, None), (16, 64)):
        feats, ids, labels, mask = training_batch(model, batch, frames, feat_dim, k)
        gfeats = torch.randn(batch, n_global, k, feat_dim) if n_global else None
        for mode, masking, mvm in (
            ("masking+MVM", True, True),
            ("masking only", True, False),
            ("no masking", False, False),
        ):
            step = functools.partial(train_step, model, opt, feats, gfeats, ids, labels, mask, masking, mvm)
            t = timed(step, repeat)
            head = len(model.text_ids(model.prompt_head))  # the chat header in front of the video
            tokens = batch * (head + frames * k + ids.shape[1])
            layout = f"{frames} frames" + (f" + global over {n_global}" if n_global else "")
            print(
                f"  {name:<8} {layout:<28} {mode:<13} step {t * 1000:8.1f} ms   {tokens / t:9.0f} input tokens/s"
            )


def bench_scoring(model, name: str, feat_dim: int, k: int, repeat: int) -> None:
    model.eval()
    feats = torch.randn(1, 16, k, feat_dim)
    video = model.video_tokens(feats, feats)
    candidates = ["A", "B", "C", "D", "E", "F", "G", "H"]
    q = ["Which option is right? Only give the best option."]
    shared = timed(lambda: model.score(video, q, candidates), repeat)
    naive = timed(lambda: score_naive(model, video, q, candidates), repeat)
    diff = (model.score(video, q, candidates) - score_naive(model, video, q, candidates)).abs().max().item()
    print(
        f"  {name:<8} 8 candidates after {video.shape[1]} video tokens: shared prefix {shared * 1000:7.1f} ms, "
        f"naive {naive * 1000:7.1f} ms, speed-up {naive / shared:4.1f}x, max |diff| {diff:.1e}"
    )


def bench_label_questions(model, name: str, feat_dim: int, k: int, repeat: int, windows: int = 29) -> None:
    """Pre-labeling's scoring call: 5 label questions (yes/no) over a batch of windows, with the tokens the
    questions share forwarded once per window vs with every question."""
    from workers.schemas import parse_labels

    model.eval()
    video = model.video_tokens(torch.randn(windows, 4, k, feat_dim), torch.randn(windows, 4, k, feat_dim))
    questions = [x.question() for x in parse_labels(["jam", "hand", "defect", "part_passing", "empty_line"])]
    shared = len(os.path.commonprefix([model.question_ids(q) for q in questions]))
    scores = functools.partial(model.score, video, questions, ["yes", "no"])
    times: dict[bool, list[float]] = {True: [], False: []}
    # interleaved, so drift on a shared machine hits both alike; the first run of each warms up
    for _ in range(repeat + 1):
        for on in times:
            t = time.perf_counter()
            scores(shared_start=on)
            times[on].append(time.perf_counter() - t)
    on, off = (statistics.median(times[x][1:]) for x in (True, False))
    diff = (scores() - scores(shared_start=False)).abs().max().item()
    print(
        f"  {name:<8} 5 questions x {windows} windows ({shared} shared tokens): once per window {on * 1000:7.1f} ms, "
        f"per question {off * 1000:7.1f} ms, speed-up {off / on:4.2f}x, max |diff| {diff:.1e}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-builtin", action="store_true")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("\nvisual tokens per video (K tokens per frame)")
    for name, k in (
        ("builtin", 4),
        ("SmolVLM2-256M/500M", 64),
        ("SmolVLM2-2.2B", 81),
        ("ST-LLM (Q-Former)", 32),
    ):
        counts = ", ".join(f"{key}: {v}" for key, v in token_counts(k).items())
        print(f"  {name:<20} K={k:<3} {counts}")

    models = [("tiny", build_model(tiny_composed(tempfile.mkdtemp()), device="cpu", dtype="fp32"), 32)]
    if not args.skip_builtin:
        models.append(("builtin", build_model("builtin", device="cpu", dtype="auto"), 1280))
    for name, model, feat_dim in models:
        k = model.backbone.tokens_per_frame
        model.video_tokens(torch.randn(1, 16, k, feat_dim), torch.randn(1, 64, k, feat_dim))  # shape check
        print(f"\nshared-prefix vs naive scoring ({name}, compute {str(model.compute_dtype).split('.')[-1]})")
        bench_scoring(model, name, feat_dim, k, args.repeat)
        bench_label_questions(model, name, feat_dim, k, args.repeat)
        print(f"\ntraining step, batch 4, frozen-encoder features cached ({name})")
        bench_training(model, name, feat_dim, k, args.repeat)
    print("\ncommand: .venv/bin/python " + shlex.join(sys.argv))


if __name__ == "__main__":
    main()
