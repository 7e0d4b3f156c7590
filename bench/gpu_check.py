"""GPU check: SmolVLM2-500M's architecture (random weights, bf16, built from the configuration values below;
nothing is downloaded) through pre-labeling of generated line videos and a few ST-LLM training steps.
Prints windows/s, video-minutes per GPU-minute, tokens/s, MFU against the card's measured bf16 GEMM peak
(and its datasheet peak), and peak memory. Meant to finish in under 5 minutes on one H100 or H200.

    python bench/gpu_check.py                 # on a CUDA machine
    python bench/gpu_check.py --smoke         # a toy-sized run of the same code on the CPU
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import LABELS, SMOLVLM2_500M, build  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode

# HuggingFaceTB/SmolVLM2-500M-Video-Instruct, config.json
SMOKE = {
    "text": {**SMOLVLM2_500M["text"], "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
    | {"num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512},
    "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    | {"image_size": 64, "patch_size": 16},
    "scale_factor": 2,
}
DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def attention_flops(q_shape, k_shape, v_shape, *_args, out_shape=None, **_kwargs) -> int:
    """FLOPs of attention with grouped K/V heads (torch's own count asserts equal heads): QK^T and PV over
    every query head, not discounted for ``is_causal`` (torch's convention; pre-labeling's scoring passes a
    mask instead, and the scores a mask blocks are taken off: bench/common.py's ``AttentionCalls``)."""
    b, heads, q_len, d = q_shape
    return 2 * b * heads * q_len * k_shape[-2] * (d + v_shape[-1])


ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention: attention_flops,
    torch.ops.aten._scaled_dot_product_efficient_attention: attention_flops,
    torch.ops.aten._scaled_dot_product_cudnn_attention: attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: attention_flops,
}


def gemm_peak(device: str) -> float:
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    sync(device)
    return reps * 2 * n**3 / (time.perf_counter() - t) / 1e12


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (checks the script runs)")
    ap.add_argument("--videos", type=int, default=None, help="default 16 (GPU) or 2 (smoke)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per video")
    ap.add_argument("--steps", type=int, default=10, help="training steps")
    ap.add_argument("--window-batch", type=int, default=32, help="windows per LLM batch (across videos)")
    ap.add_argument(
        "--sweep", action="store_true", help="also time pre-labeling at window batches of 32, 64 and 128"
    )
    args = ap.parse_args()
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.smoke:
        print("no CUDA device: running the smoke sizes on the CPU instead")
        args.smoke = True
    n_videos = args.videos or (2 if args.smoke else 16)
    duration = 10.0 if args.smoke else args.duration
    from workers.jobs import decode_side, decode_windows, prelabel_videos, window_probabilities_many
    from workers.schemas import PrelabelSettings, parse_labels
    from workers.stllm.io import build_model
    from workers.stllm.model import IGNORE
    from workers.tools.linevideo import generate_dataset

    start = time.perf_counter()
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}")
    work = Path(tempfile.mkdtemp(prefix="stllm-gpu-"))
    spec = build(SMOKE if args.smoke else SMOLVLM2_500M, work / "model")
    model = build_model(spec, device=device, dtype="bf16").eval().inference_weights()
    params = sum(p.numel() for p in model.parameters())
    k = model.backbone.tokens_per_frame
    print(
        f"model: SmolVLM2-500M architecture{' (smoke sizes)' if args.smoke else ''}, {params / 1e6:.0f}M parameters, {k} tokens/frame, bf16"
    )
    t = time.perf_counter()
    videos = [
        r["video"]
        for r in generate_dataset(work / "v", n_videos, seed=1, duration=duration, width=320, height=240)
    ]
    print(f"generated {n_videos} x {duration:.0f} s videos in {time.perf_counter() - t:.0f} s")
    labels = parse_labels(LABELS)
    settings = PrelabelSettings(frames_per_window=8, window_batch=args.window_batch).resolved()

    peak = gemm_peak(device)
    sheet = next((v for key, v in DATASHEET_BF16_TFLOPS.items() if key in name), None)
    print(f"bf16 GEMM peak measured: {peak:.0f} TFLOP/s" + (f" (datasheet {sheet:.0f})" if sheet else ""))

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    prelabel_videos(model, videos[:1], labels, settings)  # warm-up
    sync(device)
    t = time.perf_counter()
    results = prelabel_videos(model, videos, labels, settings)
    sync(device)
    seconds = time.perf_counter() - t
    windows = sum(len(r.windows) for r in results)
    failed = [r.error for r in results if r.error]
    assert not failed, failed
    print(
        f"pre-label: {windows} windows of {settings.frames_per_window} frames, {len(labels)} labels, in {seconds:.1f} s: "
        f"{windows / seconds:.1f} windows/s, {n_videos * duration / 60 / (seconds / 60):.0f} video-minutes per GPU-minute "
        f"(batches of {settings.window_batch} windows)"
    )
    if args.sweep:
        n_sweep = min(8, n_videos)
        for batch in (32, 64, 128):
            swept = settings.model_copy(update={"window_batch": batch})
            sync(device)
            t = time.perf_counter()
            prelabel_videos(model, videos[:n_sweep], labels, swept)
            sync(device)
            sec = time.perf_counter() - t
            print(
                f"  sweep: {n_sweep} videos, batches of {batch} windows: {sec:.1f} s, "
                f"{n_sweep * duration / sec:.0f} video-minutes per GPU-minute"
            )
    n_mfu = min(4, n_videos)
    ds = [
        decode_windows(
            v,
            settings.window_s,
            settings.stride_s,
            settings.frames_per_window,
            settings.global_frames,
            decode_side(model),
        )
        for v in videos[:n_mfu]
    ]
    questions = [x.question() for x in labels]
    from common import AttentionCalls

    with (
        FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter,
        AttentionCalls() as attention,
    ):
        window_probabilities_many(model, ds, questions, settings.window_batch)
    sync(device)
    t = time.perf_counter()
    window_probabilities_many(model, ds, questions, settings.window_batch)
    sync(device)
    one = time.perf_counter() - t
    flops = counter.get_total_flops() - attention.blocked  # scores a mask blocks are not the model's work
    head = len(model.text_ids(model.prompt_head))
    q_tokens = sum(len(model.question_ids(q)) for q in questions)
    tokens = sum(len(d.window_index) for d in ds) * (head + settings.frames_per_window * k + q_tokens)
    print(
        f"{n_mfu} videos' windows (compute only, decoded beforehand): {one * 1000:.0f} ms, {tokens / one:,.0f} LLM tokens/s, "
        f"{flops / one / 1e12:.1f} TFLOP/s = MFU {100 * flops / one / 1e12 / peak:.0f}% of the measured peak"
        + (f", {100 * flops / one / 1e12 / sheet:.0f}% of the datasheet's" if sheet else "")
    )
    sync(device)
    t = time.perf_counter()
    for d in ds:
        model.frame_features(d.frames)
    sync(device)
    vision = time.perf_counter() - t
    print(
        f"  of which frames -> encoder features: {vision * 1000:.0f} ms ({sum(len(d.frames) for d in ds)} frames)"
    )
    if device == "cuda":
        print(f"peak memory, inference: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")

    # training: LoRA + the small trainable parts, masking + MVM, 16 frames, global-local over 64 frames
    train_model = build_model(spec, device=device, dtype="bf16")
    train_model.attach_lora()
    train_model.train()
    opt = torch.optim.AdamW([p for p in train_model.parameters() if p.requires_grad], lr=1e-4)
    batch = 4
    frames = model.frame_features(ds[0].frames[:64]).to(device)
    feats = frames[:16].unsqueeze(0).expand(batch, -1, -1, -1)
    gfeats = frames.unsqueeze(0).expand(batch, -1, -1, -1)
    prompt = train_model.question_ids(questions[0])
    answer = train_model.text_ids("yes")
    ids = torch.tensor([prompt + answer] * batch)
    lab = torch.tensor([[IGNORE] * len(prompt) + answer] * batch)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.steps + 1):
        sync(device)
        t = time.perf_counter()
        out = train_model.training_loss(
            train_model.video_tokens(feats, gfeats), ids, lab, torch.ones_like(ids), masking=True, mvm=True
        )
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        sync(device)
        if step:
            times.append(time.perf_counter() - t)
    step_s = sorted(times)[len(times) // 2]
    tokens = batch * (head + 16 * k + ids.shape[1])
    print(
        f"training (LoRA, masking+MVM, batch {batch}, 16 frames + global over 64): {step_s * 1000:.0f} ms/step, "
        f"{tokens / step_s:,.0f} input tokens/s"
    )
    if device == "cuda":
        print(f"peak memory, training: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print(f"total {time.perf_counter() - start:.0f} s\n\ncommand: python " + shlex.join(sys.argv))


if __name__ == "__main__":
    main()
