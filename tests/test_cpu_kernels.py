"""The vision tower's attention on the CPU's tile unit (AMX): same results as SDPA, used only where it applies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers.stllm.cpu import kernels as cpu_kernels
from workers.stllm.cpu.kernels import tile_attention

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available(), reason="the CPU kernels need a CPU with AMX-BF16 and a C compiler"
)


def _projections(batch: int, heads: int, tokens: int, magnitude: float = 1.0, seed: int = 0):
    """q, k, v as an attention layer makes them: (B, H, T, 64) views of one (B, T, 3 H 64) product."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, tokens, 3 * heads * 64, generator=g) * magnitude).to(torch.bfloat16)
    return [t.view(batch, tokens, heads, 64).transpose(1, 2) for t in x.split(heads * 64, -1)]


@pytest.mark.parametrize(
    "batch,heads,tokens,magnitude,scale",
    [(1, 1, 1, 1.0, 0.125), (2, 3, 17, 1.0, 0.125), (1, 2, 50, 3.0, 0.2), (2, 2, 1024, 1.0, 0.125)],
)
def test_tile_attention_is_as_close_to_fp32_as_sdpa(batch, heads, tokens, magnitude, scale):
    """Against fp32 attention, the kernel's bf16 output errs as little as SDPA's: tails of fewer than 32
    queries or keys, strided inputs, peaked softmaxes (magnitude 3: scores in the hundreds) included."""
    q, k, v = _projections(batch, heads, tokens, magnitude)
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale).transpose(1, 2)
    sdpa = F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).float()
    with torch.inference_mode():
        tile = tile_attention(q, k, v, scale)
    assert tile.shape == (batch, tokens, heads, 64) and tile.is_contiguous() and tile.dtype == torch.bfloat16
    tile_error, sdpa_error = (tile.float() - exact).abs(), (sdpa - exact).abs()
    assert tile_error.mean() <= 1.1 * sdpa_error.mean() + 1e-6
    assert tile_error.max() <= 1.5 * sdpa_error.max() + 1e-3
    # contiguous inputs give the same result as the strided views
    torch.testing.assert_close(tile_attention(q.contiguous(), k.contiguous(), v.contiguous(), scale), tile)


@pytest.mark.parametrize("batch,heads,kv_heads,prefix,questions", [(2, 4, 2, 30, 3), (3, 9, 3, 274, 5)])
def test_tile_attention_with_grouped_heads_and_a_block_mask_is_as_close_to_fp32_as_sdpa(
    batch, heads, kv_heads, prefix, questions
):
    """The decoder's case: grouped K/V heads and the engine's additive block mask (a causal prefix, then
    questions that see the prefix and themselves), the mask expanded over the batch without a copy."""
    g = torch.Generator().manual_seed(1)
    length = prefix + 18 * questions
    q = torch.randn(batch, length, heads, 64, generator=g).to(torch.bfloat16).transpose(1, 2)
    k, v = (
        torch.randn(batch, length, kv_heads, 64, generator=g).to(torch.bfloat16).transpose(1, 2) for _ in "kv"
    )
    seen = torch.ones(length, length, dtype=torch.bool).tril()
    for i in range(questions):
        start = prefix + 18 * i
        seen[start : start + 18, prefix:start] = False
    blocked = torch.finfo(torch.bfloat16).min
    mask = torch.zeros(length, length).masked_fill_(~seen, blocked).to(torch.bfloat16)[None, None]
    mask = mask.expand(batch, 1, length, length)
    exact = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask.float(), enable_gqa=True
    ).transpose(1, 2)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2).float()
    with torch.inference_mode():
        tile = tile_attention(q, k, v, 0.125, mask)
    tile_error, sdpa_error = (tile.float() - exact).abs(), (sdpa - exact).abs()
    assert tile_error.mean() <= 1.1 * sdpa_error.mean() + 1e-6
    assert tile_error.max() <= 1.5 * sdpa_error.max() + 1e-3
    # the same mask as a (1, 1, T, T) tensor, broadcast by the kernel
    torch.testing.assert_close(tile_attention(q, k, v, 0.125, mask[:1]), tile)


def test_tile_attention_refuses_what_it_does_not_compute():
    """Inputs outside the kernel's reach raise a ValueError naming them, never reach the C code."""
    q, k, v = _projections(1, 2, 8)
    for bad in (
        (q.float(), k.float(), v.float()),  # fp32
        (q[..., :32], k[..., :32], v[..., :32]),  # head size 32
        (q, k[:, :, :4], v[:, :, :4]),  # fewer keys than queries
        (q.transpose(-1, -2), k, v),  # last dimension not contiguous
        (q, k[:, :1].expand(1, 3, 8, 64), v[:, :1].expand(1, 3, 8, 64)),  # 2 query heads over 3 K/V heads
    ):
        with pytest.raises(ValueError, match="tile attention takes"):
            tile_attention(*bad, 0.125)
    with pytest.raises(ValueError, match="tile attention takes"):  # a mask per head
        tile_attention(q, k, v, 0.125, torch.zeros(1, 2, 8, 8, dtype=torch.bfloat16))


def test_bf16_decoder_scores_with_the_tile_kernel_and_falls_back_to_sdpa_elsewhere(tmp_path):
    """inference_weights() on a CPU points a Llama decoder's attention (head size 64) at the tile kernel: the
    one-pass scoring runs it (grouped K/V heads, block mask), as close to the fp32 model's scores as SDPA;
    a causal prefill without a mask and decoding take SDPA."""
    from torch.utils.flop_counter import FlopCounterMode

    from workers.stllm.cpu.fused import register_flop_counts
    from workers.stllm.io import build_model
    from workers.stllm.testing import tiny_smolvlm

    spec = tiny_smolvlm(tmp_path / "smol", text_hidden=256)  # 4 query heads of 64 over 2 K/V heads
    model = build_model(spec, device="cpu", dtype="bf16").eval().inference_weights()
    assert model.lm.config._attn_implementation == cpu_kernels.DECODER_ATTENTION
    frames = torch.randint(
        0, 255, (4, 48, 80, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    feats = model.frame_features(frames)
    video = model.video_tokens(
        feats[:4].view(2, 2, *feats.shape[1:]), feats.unsqueeze(0).expand(2, -1, -1, -1)
    )
    questions, candidates = ["Is there a jam?", "Is a hand in view?"], ["yes", "no"]

    register_flop_counts()
    with FlopCounterMode(display=False) as counter:
        tiled = model.score(video, questions, candidates)
    assert counter.get_flop_counts()["Global"].get(torch.ops.stllm.tile_attention, 0) > 0
    model.lm.config._attn_implementation = "sdpa"
    sdpa = model.score(video, questions, candidates)
    exact = build_model(spec, device="cpu", dtype="fp32").eval().score(video.float(), questions, candidates)
    tile_error, sdpa_error = (tiled - exact).abs().mean(), (sdpa - exact).abs().mean()
    assert 0 < tile_error <= 1.25 * sdpa_error + 1e-3

    model.lm.config._attn_implementation = cpu_kernels.DECODER_ATTENTION
    with FlopCounterMode(display=False) as counter:  # causal prefill without a mask, then decoding
        text = model.generate(video[:1], "What happens?", max_new_tokens=3)
    assert len(text) == 1 and isinstance(text[0], str)
    assert torch.ops.stllm.tile_attention not in counter.get_flop_counts()["Global"]


def test_bf16_vision_tower_runs_its_attention_on_the_tile_kernel(tmp_path):
    """inference_weights() on a CPU switches a SigLIP tower's attention to the kernel: FlopCounterMode sees
    it at torch's attention count, the features stay as close to the fp32 model's as with SDPA, and a masked
    or autograd call takes the layer's own forward."""
    from torch.utils.flop_counter import FlopCounterMode

    from workers.stllm.cpu.fused import register_flop_counts
    from workers.stllm.io import build_model
    from workers.stllm.testing import tiny_smolvlm

    spec = tiny_smolvlm(tmp_path / "smol", vision_hidden=128)  # 2 heads of 64
    frames = torch.randint(
        0, 255, (3, 48, 80, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    exact = build_model(spec, device="cpu", dtype="fp32").eval().frame_features(frames)
    model = build_model(spec, device="cpu", dtype="bf16").eval().inference_weights()
    layers = [m for m in model.backbone.vision.modules() if "forward" in vars(m) and hasattr(m, "q_proj")]
    assert len(layers) == 1  # the toy tower's one layer

    register_flop_counts()
    with FlopCounterMode(display=False) as counter:
        tiled = model.frame_features(frames)
    counts = counter.get_flop_counts()["Global"]
    tokens = (model.backbone.image_size // 16) ** 2
    assert counts[torch.ops.stllm.tile_attention] == 4 * 3 * 2 * tokens * tokens * 64

    del layers[0].forward  # the layer's own forward: SDPA
    sdpa = model.frame_features(frames)
    tile_error, sdpa_error = (tiled - exact).norm() / exact.norm(), (sdpa - exact).norm() / exact.norm()
    assert 0 < tile_error <= 1.1 * sdpa_error

    layer = layers[0]
    layer.forward = cpu_kernels._vision_attention_forward.__get__(layer)
    x = torch.randn(2, tokens, 128).to(torch.bfloat16)
    mask = torch.zeros(2, 1, tokens, tokens, dtype=torch.bfloat16)
    mask[..., -3:] = torch.finfo(torch.bfloat16).min  # the last patches are padding
    with torch.inference_mode():
        torch.testing.assert_close(layer(x, attention_mask=mask)[0], type(layer).forward(layer, x, mask)[0])
    x32 = torch.randn(2, tokens, 128, requires_grad=True)
    layer.float()
    out = layer(x32)[0]  # fp32 with autograd: the layer's own forward, and gradients flow
    out.sum().backward()
    assert x32.grad is not None and x32.grad.abs().sum() > 0


def test_rope_kernel_is_llamas_rotary_embedding_bit_for_bit():
    """The one-pass rotary embedding gives transformers' Llama result exactly, for strided q/k as the
    projections make them and cos/sin per batch row or shared; anything else falls back to transformers."""
    from transformers.models.llama import modeling_llama

    g = torch.Generator().manual_seed(2)
    for batch, heads, tokens, shared in ((2, 9, 37, False), (3, 3, 5, True)):
        x = torch.randn(batch, tokens, heads, 64, generator=g).to(torch.bfloat16).transpose(1, 2)
        angles = torch.randn(1 if shared else batch, tokens, 32, generator=g) * 3
        cos, sin = (torch.cat([f(angles)] * 2, -1).to(torch.bfloat16) for f in (torch.cos, torch.sin))
        expected = x * cos.unsqueeze(1) + modeling_llama.rotate_half(x) * sin.unsqueeze(1)
        with torch.inference_mode():
            got = cpu_kernels.rope(x, cos, sin)
        assert got.shape == expected.shape and torch.equal(got, expected)
    assert cpu_kernels.rope(x.float(), cos.float(), sin.float()) is None  # fp32: not taken
    assert cpu_kernels.rope(x[..., :32], cos[..., :32], sin[..., :32]) is None  # head size 32


def test_rms_norm_kernel_matches_the_module():
    """The one-pass RMSNorm gives the eager module's output up to the fp32 sum's order (one bf16 step on a
    few elements at most); fp32, autograd and odd widths are left to the module."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(576, eps=1e-5)
    torch.nn.init.normal_(norm.weight, 1.0, 0.1)
    norm = norm.to(torch.bfloat16)
    x = (torch.randn(8, 111, 576) * 3).to(torch.bfloat16)
    with torch.inference_mode():
        eager = norm(x)
        got = cpu_kernels.rms_norm(x, norm.weight, norm.variance_epsilon)
    differ = got != eager
    assert differ.float().mean() < 1e-3
    assert ((got.float() - eager.float()).abs()[differ] <= eager.float().abs()[differ] / 64).all()
    assert cpu_kernels.rms_norm(x.float(), norm.weight.float(), 1e-5) is None
    assert cpu_kernels.rms_norm(x[..., :40].contiguous(), norm.weight[:40], 1e-5) is None
    with torch.enable_grad():
        assert cpu_kernels.rms_norm(x, norm.weight.detach().requires_grad_(), 1e-5) is None
