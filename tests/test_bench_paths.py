"""The speed benchmarks' correctness halves, at toy size: our pre-labeling gives the same per-window P(yes)
as the stock transformers path (SmolVLM processor + chat template + generate) on the same SmolVLM2-shaped
model, and the GPU check script runs end to end (CPU smoke sizes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_engine_matches_the_stock_transformers_path(tmp_path):
    from transformers import SmolVLMForConditionalGeneration

    from bench.stock_path import LABELS, build, stock_prelabel, stock_processor
    from workers.jobs import decode_side, prelabel_videos
    from workers.schemas import PrelabelSettings, parse_labels
    from workers.stllm.io import build_model
    from workers.tools.linevideo import generate_dataset

    k = build(tmp_path / "model", image_size=64)
    videos = [r["video"] for r in generate_dataset(tmp_path / "v", 1, seed=3, duration=8.0)]
    labels = parse_labels(LABELS[:2])
    settings = PrelabelSettings()
    ours = build_model(
        {"kind": "smolvlm2", "model": str(tmp_path / "model")}, device="cpu", dtype="fp32"
    ).eval()
    mine = prelabel_videos(ours, videos, labels, settings)[0]
    stock = SmolVLMForConditionalGeneration.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    with torch.inference_mode():
        theirs = stock_prelabel(
            stock,
            stock_processor(tmp_path / "model", k),
            videos,
            [x.question() for x in labels],
            settings,
            decode_side(ours),
            ours.backbone.image_size,
        )[0]
    p_ours = np.stack([mine.window_probs[x.name] for x in labels], 1)
    assert p_ours.shape == theirs.shape and p_ours.size >= 6
    # the same model on the same crops: equal up to the stock path's uint8 rounding of the crops
    assert np.abs(p_ours - theirs).max() < 0.02
    assert ((p_ours > 0.5) == (theirs > 0.5)).mean() >= 0.9


def test_gpu_check_runs_at_smoke_size():
    out = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--smoke", "--steps", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for figure in ("windows/s", "video-minutes per GPU-minute", "LLM tokens/s", "MFU", "ms/step"):
        assert figure in out.stdout, out.stdout


def test_no_bench_script_shadows_an_installed_module():
    """A script run as `python bench/x.py` puts bench/ first on sys.path: a bench/kernels.py made transformers
    import it in place of the `kernels` package it probes for, and every script that loaded a model failed."""
    import importlib.util

    shadowed = [
        p.name
        for p in (ROOT / "bench").glob("*.py")
        if p.stem != "__init__" and importlib.util.find_spec(p.stem)
    ]
    assert shadowed == []
