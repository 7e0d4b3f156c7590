"""CPU kernels for bf16 serving on the tile unit (AMX) and AVX-512: attention, and a Llama decoder's RMSNorm and
rotary embedding.

**Attention.** A SigLIP tower at SmolVLM2's 512 px attends over 1024 patches per frame, 12 heads of 64.
torch's CPU flash attention ran that at ~650 GFLOP/s here, a fifth of the GEMM peak, and a third of the
tower's time; the decoder's masked one-pass scoring ran at ~190-440. ``csrc/cpu_kernels.c`` computes the
same thing on the tile unit: for each (batch, K/V head), K and V packed once into the tile layout, then 32
query rows at a time: the scores on the tiles, the mask added, each row's softmax over all its keys with
AVX-512 (a whole row fits in cache, so no running rescale), the probabilities rounded to bf16 as SDPA does,
and their product with V on the tiles; one block's products overlap the previous block's softmax. 1.6x
SDPA at the tower's shape, 1.45-2x at the scoring's (``bench/kernel_timings.py``), with SDPA's error against fp32
(``tests/test_cpu_kernels.py``). It runs where the inputs are bf16, head size 64, queries and keys of one
length, no autograd, and either no mask (vision) or an additive mask shared by the heads (the decoder);
SDPA runs otherwise.

**RMSNorm and RoPE.** In eager PyTorch these are 4-7 passes each over the decoder's activations (casts,
products, a concatenation), a third of the scoring time of a 135M decoder. The kernels make one pass with
the module's roundings: RoPE bit for bit, RMSNorm up to the fp32 sum's order.

All of it needs a CPU with AMX-BF16 under Linux and a C compiler to build the library on first use (``cc``,
or ``$CC``; cached under ``$XDG_CACHE_HOME/stllm-labeling``). Elsewhere, or with ``STLLM_CPU_KERNELS=0``,
everything runs as in eager PyTorch.

:func:`use_cpu_kernels` switches a model's vision attention layers and Llama-family decoders to them
(``STLLM.inference_weights`` does this on CPUs); RMSNorm goes through :mod:`workers.stllm.cpu.fused`. The
attention kernel is registered as the torch operator ``stllm::tile_attention``, so FlopCounterMode and
profilers see it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import types
from pathlib import Path

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.c"
FLAGS = [
    "-O3",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512dq",
    "-mavx512vl",
    "-mavx512bf16",
    "-mamx-tile",
    "-mamx-bf16",
]
HEAD_DIM = 64
MAX_TOKENS = 8192  # its buffers stay in cache: 2 x 32 rows of scores x 8192 x 4 bytes = 2 MiB per thread


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _build(cache: Path) -> Path:
    """Compile the kernels into ``cache`` (once per source and flags; concurrent builders are safe)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (cc, gcc or $CC) to build it")
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    target = cache / f"cpu_kernels-{digest}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        built = Path(tmp) / target.name
        cmd = [compiler, *FLAGS, "-pthread", "-shared", "-fPIC", str(SOURCE), "-o", str(built)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
        os.replace(built, target)  # atomic: another process sees the whole library or none
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (logged once, with the reason) where they cannot run here."""
    try:
        missing = {"amx_tile", "amx_bf16", "avx512_bf16", "avx512bw"} - _cpu_flags()
        if missing:
            raise RuntimeError(f"this CPU lacks {', '.join(sorted(missing))}")
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stllm-labeling"
        lib = ctypes.CDLL(str(_build(cache)))
        if lib.stllm_attention_init() != 0:
            raise RuntimeError("the kernel refused the tile registers' state (Linux 5.16+ needed)")
        lib.stllm_attention.restype = ctypes.c_int
        lib.stllm_attention.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long] * 4 + [ctypes.c_void_p] * 4
        lib.stllm_attention.argtypes += [ctypes.c_float, ctypes.c_int]
        lib.stllm_rms_norm.restype = lib.stllm_rope.restype = None
        lib.stllm_rms_norm.argtypes = (
            [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3 + [ctypes.c_float, ctypes.c_int]
        )
        lib.stllm_rope.argtypes = (
            [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_void_p] * 2 + [ctypes.c_int]
        )
    except (OSError, RuntimeError) as e:
        log.info("CPU kernels not used (eager PyTorch and SDPA instead): %s", e)
        return None
    log.debug("CPU kernels loaded")
    return lib


def available() -> bool:
    """True where the CPU kernels run on this machine (built and loaded on the first call)."""
    return _library() is not None


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> bool:
    """Whether :func:`tile_attention` takes these inputs: bf16 CPU tensors, q (B, H, T, 64) and k, v
    (B, Hkv, T, 64) with H a multiple of Hkv (grouped-query attention), the last dimension contiguous, T up
    to :data:`MAX_TOKENS`; ``mask`` None or an additive bf16 mask that broadcasts to (B, 1, T, T)."""
    tensors = (q, k, v) if mask is None else (q, k, v, mask)
    if not all(x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.dim() == 4 for x in tensors):
        return False
    (b, h, t, d), kv = q.shape, k.shape
    return (
        all(x.stride(-1) == 1 for x in (q, k, v))
        and kv == v.shape
        and (kv[0], kv[2], kv[3]) == (b, t, d)
        and h % kv[1] == 0
        and d == HEAD_DIM
        and 0 < t <= MAX_TOKENS
        and (
            mask is None
            or (mask.shape[1] == 1 and torch.broadcast_shapes(mask.shape, (b, 1, t, t)) == (b, 1, t, t))
        )
    )


@torch.library.custom_op("stllm::tile_attention", mutates_args=())
def tile_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(scale Q K^T + mask) V as (B, T, H, 64) contiguous (the layout attention layers reshape their
    output from). Takes what :func:`supported` accepts; needs :func:`available`. No autograd."""
    if not supported(q, k, v, mask):
        raise ValueError(
            f"tile attention takes bf16 CPU q (B, H, T, {HEAD_DIM}), k and v (B, H / n, T, {HEAD_DIM}), "
            f"T <= {MAX_TOKENS}, a bf16 mask broadcasting to (B, 1, T, T) or none: got "
            + ", ".join(f"{tuple(x.shape)} {x.dtype}" for x in (q, k, v, mask) if x is not None)
        )
    lib = _library()
    if lib is None:
        raise RuntimeError("the tile attention kernel is not available on this machine")
    b, h, t, d = q.shape
    out = torch.empty(b, t, h, d, dtype=q.dtype)
    strides = [(ctypes.c_long * 3)(*x.stride()[:3]) for x in (q, k, v)]
    if mask is not None:
        mask = mask.expand(b, 1, t, t)
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
    mask_strides = (ctypes.c_long * 2)(*(mask.stride(0), mask.stride(2)) if mask is not None else (0, 0))
    status = lib.stllm_attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr() if mask is not None else None, out.data_ptr(),
        b, h, k.shape[1], t, *strides, mask_strides, scale, torch.get_num_threads(),
    )  # fmt: skip
    if status == -1:
        raise MemoryError("tile attention: could not allocate its buffers")
    if status != 0:
        raise RuntimeError("tile attention: the kernel refused the tile registers' state")
    return out


@tile_attention.register_fake
def _(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    b, h, t, d = q.shape
    return q.new_empty(b, t, h, d)


def _inference_bf16(*tensors: torch.Tensor) -> bool:
    return all(x.device.type == "cpu" and x.dtype == torch.bfloat16 for x in tensors) and not (
        torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
    )


def _takes(layer: nn.Module, x: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
    return (
        attention_mask is None
        and not layer.training
        and x.dim() == 3
        and 0 < x.shape[1] <= MAX_TOKENS
        and _inference_bf16(x, layer.q_proj.weight)
    )


def _vision_attention_forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs):
    """A ViT attention layer's forward (SigLIP/Idefics3: q/k/v/out projections) with the tile kernel for
    whole images (no mask) in bf16 inference; the layer's own forward otherwise."""
    if not _takes(self, hidden_states, attention_mask):
        return type(self).forward(self, hidden_states, attention_mask=attention_mask, **kwargs)
    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    q, k, v = (
        proj(hidden_states).view(shape).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj)
    )
    out = tile_attention(q, k, v, self.scale)
    return self.out_proj(out.view(*hidden_states.shape[:-1], -1)), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """Llama's RMSNorm of bf16 ``x`` in one pass, with the module's roundings (up to the fp32 sum's order);
    None where the kernel does not take it (then use the module): another dtype or device, autograd, a width
    not a multiple of 16, a non-contiguous input."""
    width = x.shape[-1]
    if not (x.dim() >= 2 and width % 16 == 0 and weight.shape == (width,) and _inference_bf16(x, weight)):
        return None
    if not (x.is_contiguous() and weight.is_contiguous()) or (lib := _library()) is None:
        return None
    out = torch.empty(x.shape, dtype=x.dtype)
    rows = x.numel() // width
    threads = torch.get_num_threads()
    lib.stllm_rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, width, width, eps, threads)
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """Llama's rotary embedding ``(x * cos) + (rotate_half(x) * sin)`` of bf16 ``x`` (B, H, T, 64) with cos
    and sin (B or 1, T, 64), in one pass with the same roundings (bit for bit). The result is (B, H, T, 64)
    laid out as (B, T, H, 64), as the projection it comes from. None where the kernel does not take it."""
    if not (x.dim() == 4 and cos.dim() == 3 and x.shape[-1] == HEAD_DIM and _inference_bf16(x, cos, sin)):
        return None
    b, h, t, d = x.shape
    if (
        cos.shape != sin.shape
        or cos.shape[1:] != (t, d)
        or cos.shape[0] not in (1, b)
        or cos.stride() != sin.stride()
    ):
        return None
    if x.stride(-1) != 1 or cos.stride(-1) != 1 or (lib := _library()) is None:
        return None
    out = torch.empty(b, t, h, d, dtype=x.dtype)
    xs = (ctypes.c_long * 3)(*x.stride()[:3])
    cs = (ctypes.c_long * 2)(0 if cos.shape[0] == 1 else cos.stride(0), cos.stride(1))
    lib.stllm_rope(
        x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), b, h, t, xs, cs, torch.get_num_threads()
    )
    return out.transpose(1, 2)


def _apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' Llama ``apply_rotary_pos_emb`` with :func:`rope` where it applies."""
    if unsqueeze_dim == 1 and (q_embed := rope(q, cos, sin)) is not None:
        if (k_embed := rope(k, cos, sin)) is not None:
            return q_embed, k_embed
    return _LLAMA_ROPE(q, k, cos, sin, unsqueeze_dim)


_LLAMA_ROPE = None  # transformers' own function, kept when it is replaced


def use_rope_kernel() -> None:
    """Replace transformers' Llama ``apply_rotary_pos_emb``, for every Llama model in the process, by one that
    runs :func:`rope` where it applies and the original otherwise (a no-op where the kernels cannot run).
    Process-wide: only :func:`workers.stllm.cpu.tune_process` calls it."""
    global _LLAMA_ROPE
    from transformers.models.llama import modeling_llama

    if _LLAMA_ROPE is None and available():
        _LLAMA_ROPE = modeling_llama.apply_rotary_pos_emb
        modeling_llama.apply_rotary_pos_emb = _apply_rotary_pos_emb


DECODER_ATTENTION = "stllm_tile"  # the name the decoders' attention is registered under in transformers


def _decoder_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """transformers' attention function for the decoders :func:`use_cpu_kernels` switched: the tile
    kernel for bf16 inference over one sequence under an explicit mask (the engine's one-pass scoring, its
    block mask), SDPA (transformers' own function) for everything else: causal prefill without a mask (SDPA
    skips the masked half), decoding over a cache, training."""
    mask = attention_mask
    if (
        mask is not None
        and not module.training
        and dropout == 0.0
        and not any(
            kwargs.get(k) is not None for k in ("softcap", "position_bias", "sliding_window", "s_aux")
        )
        and _inference_bf16(query, key, value)
        and available()
    ):
        if mask.dtype == torch.bool:  # True: attend
            mask = torch.zeros(mask.shape, dtype=query.dtype).masked_fill_(
                ~mask, torch.finfo(query.dtype).min
            )
        if supported(query, key, value, mask):
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            return tile_attention(query, key, value, scale, mask), None
    return _SDPA(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=dropout,
        scaling=scaling,
        is_causal=is_causal,
        **kwargs,
    )


_SDPA = None  # transformers' SDPA attention function, which the decoders fall back to


def _register_decoder_attention() -> None:
    global _SDPA
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    _SDPA = sdpa_attention_forward
    AttentionInterface.register(DECODER_ATTENTION, _decoder_attention)
    AttentionMaskInterface.register(DECODER_ATTENTION, sdpa_mask)  # masks made as for SDPA


def _is_decoder_attention(module: nn.Module) -> bool:
    names = {n for n, _ in module.named_children()}
    config = getattr(module, "config", None)
    return (
        {"q_proj", "k_proj", "v_proj", "o_proj"} <= names
        and getattr(module, "is_causal", None) is True
        and getattr(module, "head_dim", None) == HEAD_DIM
        and getattr(config, "_attn_implementation", None) == "sdpa"
    )


def _is_vision_attention(module: nn.Module) -> bool:
    names = {n for n, _ in module.named_children()}
    return (
        {"q_proj", "k_proj", "v_proj", "out_proj"} <= names
        and getattr(module, "is_causal", None) is False
        and getattr(module, "head_dim", None) == HEAD_DIM
        and isinstance(getattr(module, "scale", None), float)
    )


def use_cpu_kernels(model: nn.Module) -> int:
    """Switch ``model``'s attention to the tile kernel where it applies, in place: ViT attention layers
    (SigLIP, Idefics3's vision tower) and the attention of Llama-family decoders running SDPA (their config's
    attention implementation becomes ``"stllm_tile"``, which falls back to SDPA call by call). The rotary
    embedding's kernel is process-wide (:func:`use_rope_kernel`). Returns how many layers changed:
    0 where :func:`available` is false or the model has none."""
    vision = [m for m in model.modules() if _is_vision_attention(m)]
    decoder = [m for m in model.modules() if _is_decoder_attention(m)]
    if not (vision or decoder) or not available():
        return 0
    for m in vision:
        m.forward = types.MethodType(_vision_attention_forward, m)
    if decoder:
        _register_decoder_attention()
        for m in decoder:
            m.config._attn_implementation = DECODER_ATTENTION
    log.debug("tile attention: %d vision and %d decoder attention layers", len(vision), len(decoder))
    return len(vision) + len(decoder)
