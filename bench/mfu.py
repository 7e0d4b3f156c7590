"""The engine against this machine's limit: matrix-multiply peak (large GEMM, bf16 and fp32), then the FLOPs
the engine achieves in batched pre-label inference (vision encoder + LLM prefill and scoring) as a share of
the peak of the dtype it computes in (MFU). FLOPs are counted by torch's FlopCounterMode on the same call
that is then timed without it; attention scores that a mask blocks (causal, or the block mask that runs the
label questions side by side) are the kernel's waste, not the model's work, and are left out.

A second block puts the MFU in context: the ceiling it could reach if every FLOP outside attention ran at the
GEMM peak and nothing else took time, with attention as fast as this CPU's attention kernel runs the engine's
own attention calls (replayed alone on random inputs of the same shapes). Attention cannot run at the GEMM
peak: its softmax is an exponential per score, which no matrix unit computes.

    .venv/bin/python bench/mfu.py [--model builtin] [--duration 60]
    .venv/bin/python bench/mfu.py --model smolvlm2-256m-shaped --duration 20 --repeat 1

``smolvlm2-256m-shaped`` is SmolVLM2-256M's architecture (SigLIP-B/16 at 512 px, SmolLM2-135M) with random
weights, built from its configuration values (bench/gpu_check.py): no download.
"""

from __future__ import annotations

import argparse
import functools
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ATTENTION_OPS, AttentionCalls  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode

from workers.stllm.cpu import kernels as cpu_kernels  # noqa: E402, F401  (registers torch.ops.stllm.tile_attention)
from workers.stllm.cpu.fused import fusion_available, pack_linear_weight  # noqa: E402


def gemm_peak(dtype: torch.dtype, m: int, k: int, n: int, seconds: float = 2.0) -> float:
    """Best GFLOP/s of repeated (m x k) @ (k x n) products in ``dtype``: as ``a @ b`` and, in bf16 where
    oneDNN can pack weights, as the packed linear kernel the engine serves with (whichever is faster)."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    products = [lambda: a @ b]
    if dtype == torch.bfloat16 and fusion_available(b):
        packed = pack_linear_weight(b.t().contiguous(), m)
        products.append(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""))
    best = 0.0
    for product in products:
        for _ in range(3):
            product()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            for _ in range(4):
                product()
            best = max(best, 4 * 2 * m * k * n / (time.perf_counter() - t) / 1e9)
    return best


def timed(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def replay_seconds(calls: list[tuple], repeat: int = 5) -> float:
    """Seconds the recorded attention calls take when each runs alone on random inputs of the same layout
    (best of ``repeat`` per distinct call, times how often it occurred)."""
    from collections import Counter

    def make(a):
        if isinstance(a, tuple) and a and a[0] == "tensor":
            shape, stride, dtype = a[1:]
            # storage filled first: a layout may repeat elements (a mask expanded over the batch)
            size = 1 + sum((n - 1) * st for n, st in zip(shape, stride, strict=True)) if all(shape) else 0
            base = torch.empty(size, dtype=dtype)
            base = base.normal_() if base.is_floating_point() else base.fill_(True)
            return base.as_strided(shape, stride)
        return a

    total = 0.0
    for (func, args, kwargs), count in Counter(calls).items():
        call = functools.partial(func, *[make(a) for a in args], **{k: make(v) for k, v in kwargs})
        total += count * timed(call, repeat)
    return total


def counted(fn) -> tuple[float, float, list[tuple]]:
    """FLOPs of one call of ``fn``: (all, attention's), and its attention calls. Attention scores that a mask
    blocks are left out (causal calls without a mask are halved by ``register_flop_counts``)."""
    with FlopCounterMode(display=False) as counter, AttentionCalls() as attention:
        fn()
    by_op = counter.get_flop_counts().get("Global", {})
    attention_flops = sum(by_op.get(op, 0) for op in ATTENTION_OPS)
    return counter.get_total_flops() - attention.blocked, attention_flops - attention.blocked, attention.calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--autocast-only", action="store_true", help="keep fp32 weights (as training does)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per part (the best is kept)")
    args = ap.parse_args()
    from workers.jobs import decode_side, decode_windows, window_probabilities
    from workers.schemas import PrelabelSettings, parse_labels
    from workers.stllm.cpu.fused import register_flop_counts
    from workers.stllm.io import build_model, keep_freed_memory
    from workers.tools.linevideo import generate_dataset

    register_flop_counts()  # the fused CPU kernels' FLOPs, counted as the linear layers they replace
    keep_freed_memory()  # as the engine runs (build_model does this too): the peak under the same allocator
    threads = torch.get_num_threads()

    def measure_peaks() -> dict[str, float]:
        peaks = {}
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            peaks[name] = max(gemm_peak(dtype, 2048, 2048, 2048), gemm_peak(dtype, 512, 576, 1536))
        return peaks

    peaks = measure_peaks()

    spec = args.model
    if args.model == "smolvlm2-256m-shaped":
        from common import SMOLVLM2_256M, build

        spec = build(SMOLVLM2_256M, Path(tempfile.mkdtemp(prefix="stllm-256m-")) / "model")
    model = build_model(spec, device="cpu", dtype="auto").eval()
    if args.autocast_only:
        print("weights kept in fp32, bf16 by autocast")
    else:
        model.inference_weights()
    dtype = "bf16" if model.compute_dtype == torch.bfloat16 else "fp32"
    work = Path(tempfile.mkdtemp(prefix="stllm-mfu-"))
    video = generate_dataset(work, 1, seed=7, duration=args.duration)[0]["video"]
    s = PrelabelSettings().resolved()
    d = decode_windows(
        video, s.window_s, s.stride_s, s.frames_per_window, s.global_frames, decode_side(model)
    )
    questions = [x.question() for x in parse_labels(["jam", "hand", "defect", "part_passing", "empty_line"])]

    def vision() -> None:
        model.frame_features(d.frames)

    features = model.frame_features(d.frames)

    def llm() -> None:
        with torch.inference_mode():
            g = features[d.global_index].unsqueeze(0)
            for i in range(0, len(d.window_index), s.window_batch):
                idx = d.window_index[i : i + s.window_batch]
                video_tokens = model.video_tokens(features[idx], g.expand(len(idx), -1, -1, -1))
                model.score(video_tokens, questions, ["yes", "no"])

    def whole() -> None:
        window_probabilities(model, d, questions, s.window_batch)

    print(
        f"engine: {args.model}, computing in {dtype}; one {args.duration:.0f} s video: {len(d.frames)} frames "
        f"decoded, {len(d.window_index)} windows x {s.frames_per_window} frames, {len(questions)} labels, "
        f"batches of {s.window_batch} windows"
    )
    parts = []
    for name, fn in (("vision encoder", vision), ("LLM prefill + scoring", llm), ("whole pre-label", whole)):
        flops, attention_flops, calls = counted(fn)
        parts.append((name, flops, timed(fn, args.repeat), attention_flops, replay_seconds(calls)))
    # the peak measured again after the engine ran, the best of both kept: a shared machine's slow moment
    # lowers a peak as much as a run, and a low peak would flatter the MFU
    after = measure_peaks()
    peaks = {k: max(v, after[k]) for k, v in peaks.items()}
    for name in peaks:
        print(
            f"GEMM peak, {threads} threads, {name}: {peaks[name]:.0f} GFLOP/s "
            f"(best of 2048^3 and 512x576x1536, SmolLM2-135M's MLP, before and after the engine ran"
            + (", as a @ b and as the packed linear kernel)" if name == "bf16" else ")")
        )
    peak = peaks[dtype] * 1e9
    for name, flops, seconds, _, _ in parts:
        achieved = flops / seconds / 1e9
        print(
            f"  {name:<22} {flops / 1e9:8.1f} GFLOP in {seconds * 1000:7.1f} ms = {achieved:6.0f} GFLOP/s "
            f"-> MFU {100 * achieved / peaks[dtype]:.0f}% of the {dtype} GEMM peak"
        )
    print(
        "ceiling: every FLOP outside attention at the GEMM peak, nothing else taking time, and attention as fast"
        "\nas this CPU's attention kernel runs the same calls on their own:"
    )
    for name, flops, seconds, attention_flops, attention_seconds in parts:
        bound = (flops - attention_flops) / peak + attention_seconds
        if attention_seconds:
            rate = attention_flops / attention_seconds / 1e9
            what = f"attention {100 * attention_flops / flops:4.1f}% of FLOPs at {rate:5.0f} GFLOP/s"
        else:
            what = "no attention"
        print(
            f"  {name:<22} {what} -> MFU at most {100 * flops / bound / peak:.0f}%; "
            f"the engine runs at {100 * bound / seconds:.0f}% of it"
        )
    print("\ncommand: .venv/bin/python " + shlex.join(sys.argv))


if __name__ == "__main__":
    main()
