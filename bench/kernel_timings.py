"""Single CPU kernels at the engine's shapes, timed alone: what bounds the MFU that bench/mfu.py prints.

Each line is the best of repeated calls, in bf16, with malloc keeping freed memory as a worker does:

- the oneDNN linear kernel with the plain weight and with the weight packed once (as serving runs it), at
  SmolLM2-135M's and SigLIP-B's shapes, and the output head;
- SigLIP's ``fc1`` alone and with GELU inside it (the model's tanh form; exact, erf, as bf16 serving
  computes it) or after it;
- SmolLM2's ``down_proj`` (1536 -> 576) across row counts, on 1 and 2 threads;
- attention at SigLIP's shape (16 frames x 12 heads x 1024 tokens x 64) as the model calls it, contiguous,
  one frame at a time, its two products alone in flash-sized blocks (no softmax: a bound for any attention
  kernel built on these products), and the question pass's short masked attention;
- RMSNorm: the eager module's passes, ``F.rms_norm``, and LayerNorm's native kernel for scale.

    .venv/bin/python bench/kernel_timings.py [--only linear,gelu,down,attention,norm]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import torch
import torch.nn.functional as F

from workers.stllm.cpu import kernels as cpu_kernels  # noqa: E402
from workers.stllm.cpu.fused import fusion_available, pack_linear_weight  # noqa: E402

BF16 = torch.bfloat16


def best_ms(fn, repeat: int = 15) -> float:
    """Best wall time of ``repeat`` calls, in ms, after warm-up calls."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def linear(x: torch.Tensor, weight: torch.Tensor, attr: str = "none", algorithm: str = "") -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, attr, [], algorithm)


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape).to(BF16)


def linear_lines() -> None:
    print("linear layers, plain weight vs packed once (rows x in -> out):")
    for rows, k, n in (
        (980, 576, 576),
        (616, 576, 192),
        (980, 576, 1536),
        (70, 576, 49152),
        (16384, 768, 768),
    ):
        x, w = rand(rows, k), rand(n, k) * 0.02
        packed = pack_linear_weight(w)
        gflop = 2 * rows * k * n / 1e9
        plain_ms = best_ms(lambda x=x, w=w: linear(x, w))
        packed_ms = best_ms(lambda x=x, w=packed: linear(x, w))
        print(
            f"  {rows:>5} x {k} -> {n:<5}  plain {plain_ms:7.3f} ms ({gflop / plain_ms:5.2f} TFLOP/s)  "
            f"packed {packed_ms:7.3f} ms ({gflop / packed_ms:5.2f} TFLOP/s)"
        )


def gelu_lines() -> None:
    x, w = rand(2048, 768), rand(3072, 768) * 0.05
    w = pack_linear_weight(w)
    print("SigLIP fc1, 2048 x 768 -> 3072, and its GELU:")
    print(f"  product alone                 {best_ms(lambda: linear(x, w)):6.2f} ms")
    print(f"  tanh-GELU inside              {best_ms(lambda: linear(x, w, 'gelu', 'tanh')):6.2f} ms")
    print(f"  erf-GELU inside (served)      {best_ms(lambda: linear(x, w, 'gelu', 'none')):6.2f} ms")
    after = best_ms(lambda: F.gelu(linear(x, w), approximate="tanh"))
    print(f"  tanh-GELU as a separate pass  {after:6.2f} ms")


def down_lines() -> None:
    w = pack_linear_weight(rand(576, 1536) * 0.02)
    print("SmolLM2 down_proj, 1536 -> 576, packed weight (TFLOP/s on 2 threads / on 1 thread):")
    threads = torch.get_num_threads()
    for rows in (256, 616, 980, 1280, 1408, 1536, 2240, 4096):
        x = rand(rows, 1536)
        gflop = 2 * rows * 1536 * 576 / 1e9
        rates = []
        for n in (threads, 1):
            torch.set_num_threads(n)
            rates.append(gflop / best_ms(lambda x=x: linear(x, w)))
        torch.set_num_threads(threads)
        print(f"  {rows:>5} rows  {rates[0]:5.2f} / {rates[1]:5.2f}")


def attention_lines() -> None:
    frames, heads, tokens, dim = 16, 12, 1024, 64
    gflop = 4 * frames * heads * tokens * tokens * dim / 1e9
    qkv = rand(frames, tokens, 3, heads, dim)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # strided, as SigLIP calls it
    qc, kc, vc = (t.contiguous() for t in (q, k, v))
    sdpa = F.scaled_dot_product_attention
    print(f"attention, {frames} frames x {heads} heads x {tokens} tokens x {dim} (GFLOP/s):")
    print(f"  as the model calls it     {gflop / best_ms(lambda: sdpa(q, k, v), 5) * 1e3:5.0f}")
    print(f"  contiguous                {gflop / best_ms(lambda: sdpa(qc, kc, vc), 5) * 1e3:5.0f}")
    one_by_one = best_ms(lambda: [sdpa(q[i : i + 1], k[i : i + 1], v[i : i + 1]) for i in range(frames)], 5)
    print(f"  one frame at a time       {gflop / one_by_one * 1e3:5.0f}")
    if cpu_kernels.available():  # the kernel serving uses on AMX CPUs; SDPA's output transposed as its is
        flash = best_ms(lambda: sdpa(q, k, v).transpose(1, 2).contiguous(), 5)
        tile = best_ms(lambda: cpu_kernels.tile_attention(q, k, v, dim**-0.5), 5)
        print(
            f"  tile kernel (serving)     {gflop / tile * 1e3:5.0f}  ({flash / tile:.2f}x SDPA with its output transposed)"
        )
    blocks = 24  # 128-query blocks, as a flash kernel tiles them: Q K^T and P V without the softmax between
    qb, kt, p, vb = (
        rand(blocks, 128, dim),
        rand(blocks, dim, tokens),
        rand(blocks, 128, tokens),
        rand(blocks, tokens, dim),
    )
    products = best_ms(lambda: (torch.bmm(qb, kt), torch.bmm(p, vb)))
    print(
        f"  its two products alone    {4 * blocks * 128 * tokens * dim / 1e9 / products * 1e3:5.0f}  (128-query blocks, no softmax)"
    )
    rows, width, cached = 70, 14, 58  # the builtin's question pass: 14 windows x 5 questions
    q = rand(rows, width, 9, dim).transpose(1, 2)
    k, v = (rand(rows, cached, 3, dim).transpose(1, 2) for _ in range(2))
    mask = torch.zeros(rows, 1, width, cached)
    mask[..., cached - width :] = torch.full((width, width), float("-inf")).triu(1)
    mask = mask.to(BF16)
    ms = best_ms(lambda: sdpa(q, k, v, attn_mask=mask, enable_gqa=True), 30)
    print(f"  question pass, {rows} x 9 heads x {width} over {cached} cached, masked: {ms:.2f} ms")
    if cpu_kernels.available():  # one-pass scoring: 32 windows x (274-token prefix + 5 questions of 18)
        batch, prefix, length = 32, 274, 274 + 5 * 18
        q = rand(batch, length, 9, dim).transpose(1, 2)
        k, v = (rand(batch, length, 3, dim).transpose(1, 2) for _ in range(2))
        seen = torch.ones(length, length, dtype=torch.bool).tril()
        for start in range(prefix, length, 18):
            seen[start : start + 18, prefix:start] = False
        mask = torch.zeros(length, length).masked_fill_(~seen, torch.finfo(BF16).min).to(BF16)[None, None]
        mask = mask.expand(batch, 1, length, length)
        flash = best_ms(
            lambda: sdpa(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2).contiguous(), 5
        )
        tile = best_ms(lambda: cpu_kernels.tile_attention(q, k, v, dim**-0.5, mask), 5)
        print(
            f"  one-pass scoring, {batch} x 9 heads (3 K/V) x {length} tokens, block mask: SDPA {flash:.1f} ms, "
            f"tile kernel {tile:.1f} ms"
        )


def norm_lines() -> None:
    x, w = rand(15400, 576), (1 + 0.1 * torch.randn(576)).to(BF16)

    def eager() -> torch.Tensor:  # transformers' LlamaRMSNorm
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
        return w * h.to(x.dtype)

    print("norms at 15400 x 576 (14 windows x 1100 tokens, SmolLM2's width):")
    print(f"  RMSNorm, eager (the model)  {best_ms(eager):6.2f} ms")
    print(f"  F.rms_norm                  {best_ms(lambda: F.rms_norm(x, [576], w, 1e-5)):6.2f} ms")
    print(f"  LayerNorm's native kernel   {best_ms(lambda: F.layer_norm(x, [576], w, None, 1e-5)):6.2f} ms")


PARTS = {
    "linear": linear_lines,
    "gelu": gelu_lines,
    "down": down_lines,
    "attention": attention_lines,
    "norm": norm_lines,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(PARTS), help="comma-separated parts: " + ", ".join(PARTS))
    args = ap.parse_args()
    from workers.stllm.io import keep_freed_memory

    if not fusion_available(torch.zeros(1, dtype=BF16)):
        sys.exit("this torch build has no oneDNN linear kernels (or STLLM_FUSED_LINEAR=0)")
    keep_freed_memory()
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, bf16\n")
    with torch.inference_mode():
        for name in args.only.split(","):
            PARTS[name.strip()]()
            print()
    print("command: .venv/bin/python " + shlex.join(sys.argv))


if __name__ == "__main__":
    main()
