"""Serving on a CPU, behind one hook: :func:`serve_on_cpu` (called by ``STLLM.inference_weights``) switches a
bf16 model's linear layers, MLPs and norms to oneDNN's fused kernels (:mod:`.fused`) and, where the CPU has AMX,
its attention to the tile kernels (:mod:`.kernels`). :func:`tune_process` makes the process-wide changes
that help a CPU worker; only a worker's or a command's start calls it. See ``README.md`` beside this file."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch.nn as nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CpuServing:
    fused_linear: bool = True  # oneDNN fused linear layers, MLPs and RMSNorm
    exact_gelu: bool = True  # a tanh-form GELU computed as exact GELU inside the fused kernels
    kernels: bool = True  # AMX tile attention, one-pass RMSNorm and RoPE (where the CPU has AMX)


def serve_on_cpu(model: nn.Module, options: CpuServing | None = None) -> int:
    """Switch a bf16 CPU model to the fused layers and kernels that ``options`` allow, in place; returns how
    many modules changed."""
    from workers.stllm.cpu.fused import fuse_linear_layers
    from workers.stllm.cpu.kernels import use_cpu_kernels

    o = options or CpuServing()
    changed = fuse_linear_layers(model, exact_gelu=o.exact_gelu) if o.fused_linear else 0
    if o.kernels:
        changed += use_cpu_kernels(model)
    return changed


_TUNED = False


def tune_process(keep_freed_memory: bool = True, kernels: bool = True) -> None:
    """Process-wide changes for a CPU serving process, made once: malloc keeps freed memory
    (:func:`.memory.keep_freed_memory`), transformers' SDPA runs grouped-query attention without copying K/V,
    and, with ``kernels``, Llama's rotary embedding runs the one-pass kernel in every Llama model of the
    process. Call it at a worker's or a command's start only."""
    global _TUNED
    if _TUNED:
        return
    _TUNED = True
    from workers.stllm.cpu.memory import keep_freed_memory as keep

    if keep_freed_memory:
        keep()
    os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")  # exact; 25% faster on a CPU
    if kernels:
        from workers.stllm.cpu.kernels import use_rope_kernel

        use_rope_kernel()
