"""Fused linear layers for bf16 inference on CPUs with bf16 matrix units.

In eager PyTorch a linear layer with a bias is two passes over its output (``addmm`` first copies the bias
into it), and an MLP's activation and gating are more passes over an intermediate 4x the model width. On a
CPU worker those passes are memory-bound and cost as much as the matrix products themselves. oneDNN can
apply the bias, GELU, SiLU and an element-wise product to the product's output while it is still in
cache (``torch.ops.mkldnn._linear_pointwise``, the kernel torch.compile uses on CPUs). :func:`fuse_linear_layers`
switches a model's layers to it in place:

- every plain ``nn.Linear``: bias inside the product;
- MLPs ``fc2(act(fc1(x)))`` with a GELU (ViT/SigLIP vision towers): GELU inside ``fc1`` (the tanh form
  computed as exact GELU: see :func:`gelu_algorithm`);
- gated MLPs ``down(silu(gate(x)) * up(x))`` (Llama family decoders): SiLU inside ``gate``, the product
  with it inside ``up``;
- and, not a oneDNN kernel but the same kind of rewrite, Llama's RMSNorm in fewer passes over its fp32
  copy (:func:`_rms_norm_forward`): up to 6% of a 135M decoder's scoring time, same function.

Each layer's weight is also kept in oneDNN's blocked layout (:func:`packed_weight`), made on first use
instead of on every call; at the small products of a 135M decoder that is up to 2x per product (576 x 576
at 1000 rows) and 5-10% of the LLM's time. It costs a second copy of the linear weights in memory.

Parameters, their names and ``state_dict`` do not change, and a layer falls back to the eager path for
anything else (fp32 inputs, autograd, another device), so training code is unaffected. Outputs match the
eager bf16 path to bf16 rounding (tests/test_engine.py checks log-probabilities).
"""

from __future__ import annotations

import logging
import types
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from workers.stllm.cpu import kernels as cpu_kernels

log = logging.getLogger(__name__)

# activation classes (by name: torch's and transformers') -> whether the model's GELU is the tanh form
_GELU = {"GELUTanh": True, "PytorchGELUTanh": True, "NewGELUActivation": True, "GELUActivation": False}
_SILU = {"SiLU", "SiLUActivation"}


def _onednn_switched_on(dtype: torch.dtype = torch.float32) -> bool:
    """oneDNN's fused kernels are built into this torch and run ``dtype`` on this CPU (bf16 needs AVX512
    BW/VL/DQ or AVX-NE-CONVERT: on an AVX2-only CPU the bf16 model keeps torch's own layers)."""
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype != torch.bfloat16 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def gelu_algorithm(tanh_form: bool, exact: bool = True) -> str:
    """oneDNN's GELU algorithm for a model's GELU inside a bf16 product: ``"none"`` (exact, erf) for both forms
    unless ``exact`` is False.

    The tanh form is a fast approximation of exact GELU. The two differ by at most
    4.7e-4 (at x = -2.70, where bf16 itself rounds the product's output to steps of 0.016). On a CPU,
    oneDNN's tanh post-op costs 80-95% of SigLIP's ``fc1`` product itself, erf 25-42% (bench/kernel_timings.py):
    5-8% of a SigLIP tower's time. The tower's features stay as close to the fp32 model's (tanh) as with the
    tanh post-op (tests/test_engine.py). fp32 and autograd keep the model's own function.
    """
    if tanh_form and not exact:
        return "tanh"
    return "none"


def fusion_available(weight: torch.Tensor) -> bool:
    """True where oneDNN's fused linear kernel can run ``weight``: a bf16 CPU tensor on a build with oneDNN."""
    return (
        _onednn_switched_on(torch.bfloat16)
        and weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def _fusable(x: torch.Tensor, layer: nn.Module) -> bool:
    return (
        x.dtype == layer.weight.dtype
        and x.device.type == "cpu"
        and x.numel() > 0
        and not (torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad))
    )


# layer -> (the weight's identity when packed, packed weight)
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def pack_linear_weight(weight: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """A bf16 (out, in) linear weight in oneDNN's blocked layout, for ``_linear_pointwise``: the kernel then
    skips reordering it on every call. ``rows`` is the row count the layout is chosen for; it serves other
    counts too. Needs :func:`fusion_available`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)


def packed_weight(layer: nn.Linear) -> torch.Tensor:
    """``layer.weight`` packed (:func:`pack_linear_weight`), made once and kept beside the layer (not in it:
    ``state_dict`` and copies of the model do not see it). It is made again whenever the weight is another
    tensor or torch counted an in-place change to it (``copy_``, ``load_state_dict``). Writes through
    ``weight.data`` are not counted: call :func:`forget_packed_weights` after those."""
    weight = layer.weight
    key = (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape))
    cached = _PACKED.get(layer)
    if cached is None or cached[0] != key:
        cached = (key, pack_linear_weight(weight))
        _PACKED[layer] = cached
    return cached[1]


def forget_packed_weights() -> None:
    """Drop every packed weight (they are made again on next use)."""
    _PACKED.clear()


def _pointwise(x: torch.Tensor, layer: nn.Linear, attr: str = "none", algorithm: str = "") -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(flat, packed_weight(layer), layer.bias, attr, [], algorithm)
    return out.view(*x.shape[:-1], out.shape[-1])


def _product(x: torch.Tensor, other: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """layer(x) * other, the product taken inside the matrix product's output."""
    flat = x.reshape(-1, x.shape[-1])
    other = other.reshape(flat.shape[0], -1)
    out = torch.ops.mkldnn._linear_pointwise.binary(flat, other, packed_weight(layer), layer.bias, "mul")
    return out.view(*x.shape[:-1], out.shape[-1])


class FusedLinear(nn.Linear):
    """``nn.Linear`` whose bias is added inside oneDNN's product (same parameters; eager fallback)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fusable(x, self):
            return _pointwise(x, self)
        return F.linear(x, self.weight, self.bias)


def _gelu_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    if _fusable(x, self.fc1):
        algorithm = gelu_algorithm(_GELU[type(self.activation_fn).__name__], self._stllm_exact_gelu)
        return self.fc2(_pointwise(x, self.fc1, "gelu", algorithm))
    return self.fc2(self.activation_fn(self.fc1(x)))


def _gated_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    if _fusable(x, self.gate_proj) and _fusable(x, self.up_proj):
        gate = _pointwise(x, self.gate_proj, "swish")
        return self.down_proj(_product(x, gate, self.up_proj))
    return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _rms_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Llama's RMSNorm (``weight * (x / rms(x)).to(x.dtype)``, computed in fp32) with the fp32 copy scaled
    in place and the mean square read by one fused reduction: the same roundings as the eager module, except
    the fp32 sum's order. Autograd, another device or an input in another dtype than the weight take the
    module's own forward."""
    if not _fusable(x, self):
        return type(self).forward(self, x)
    if (out := cpu_kernels.rms_norm(x, self.weight, self.variance_epsilon)) is not None:
        return out  # one pass in C where the CPU kernels are built (workers.stllm.cpu.kernels)
    h = x.to(torch.float32, copy=True)  # scaled in place below: never the caller's tensor
    mean_square = torch.linalg.vector_norm(h, dim=-1, keepdim=True).square_().div_(h.shape[-1])
    return h.mul_(mean_square.add_(self.variance_epsilon).rsqrt_()).to(x.dtype).mul_(self.weight)


def _is_plain_linear(module: object) -> bool:
    return type(module) in (nn.Linear, FusedLinear)


def fuse_linear_layers(model: nn.Module, exact_gelu: bool = True) -> int:
    """Switch ``model``'s linear layers, MLPs and RMSNorms to the fused kernels, in place. Returns how many
    modules changed (0 where :func:`fusion_available` is false for the model's weights). ``exact_gelu``: see
    :func:`gelu_algorithm`."""
    changed = 0
    for module in model.modules():
        if type(module) is nn.Linear and fusion_available(module.weight):
            module.__class__ = FusedLinear
            changed += 1
        names = {n for n, _ in module.named_children()}
        if {"fc1", "fc2", "activation_fn"} <= names and _is_plain_linear(module.fc1):
            if type(module.activation_fn).__name__ in _GELU and fusion_available(module.fc1.weight):
                module.forward = types.MethodType(_gelu_mlp_forward, module)
                module._stllm_exact_gelu = exact_gelu
                changed += 1
        if {"gate_proj", "up_proj", "down_proj", "act_fn"} <= names and type(module.act_fn).__name__ in _SILU:
            if all(
                _is_plain_linear(getattr(module, n)) for n in ("gate_proj", "up_proj")
            ) and fusion_available(module.gate_proj.weight):
                module.forward = types.MethodType(_gated_mlp_forward, module)
                changed += 1
        if type(module).__name__ == "LlamaRMSNorm" and fusion_available(module.weight):
            module.forward = types.MethodType(_rms_norm_forward, module)
            changed += 1
    if changed:
        log.debug("fused %d linear layers, MLPs and norms for CPU inference", changed)
    return changed


def register_flop_counts() -> None:
    """Teach ``torch.utils.flop_counter.FlopCounterMode`` the CPU kernels it misses, so FLOP counts
    (bench/mfu.py) include them: the fused linear layers (2 x M x K x N, as the layers they replace), the
    folded convolutions (as the convolutions they replace), CPU flash attention (torch's count for
    attention, halved when causal) and the tile attention kernel (:mod:`workers.stllm.cpu.kernels`).
    Safe to call more than once."""
    from torch.utils import flop_counter

    linear = torch.ops.mkldnn._linear_pointwise  # both overloads (default and binary)
    convolution = torch.ops.mkldnn._convolution_pointwise  # (X, W, ...) or, binary, (X, other, W, ...)
    attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if convolution not in flop_counter.flop_registry:

        def convolution_flops(x_shape, second, third, *_args, out_shape=None, **_kwargs) -> int:
            weight = third if tuple(second) == tuple(out_shape) else second
            return flop_counter.conv_flop_count(x_shape, weight, out_shape, transposed=False)

        flop_counter.register_flop_formula(convolution)(convolution_flops)
    if linear not in flop_counter.flop_registry:

        def linear_flops(x_shape, *_args, out_shape=None, **_kwargs) -> int:
            rows = 1
            for d in x_shape[:-1]:
                rows *= d
            return 2 * rows * x_shape[-1] * out_shape[-1]

        flop_counter.register_flop_formula(linear)(linear_flops)
    tile = torch.ops.stllm.tile_attention
    if tile not in flop_counter.flop_registry:

        def tile_attention_flops(q_shape, k_shape, *_args, **_kwargs) -> int:
            b, h, t, d = q_shape  # grouped K/V heads do the work of one per query head
            return 4 * b * h * t * k_shape[2] * d  # Q K^T and P V, as torch counts attention

        flop_counter.register_flop_formula(tile)(tile_attention_flops)
    if attention not in flop_counter.flop_registry:

        def attention_flops(q_shape, k_shape, v_shape, dropout_p=0.0, is_causal=False, **_kwargs) -> int:
            full = flop_counter.sdpa_flop_count(q_shape, k_shape, v_shape)
            return full // 2 if is_causal else full

        flop_counter.register_flop_formula(attention)(attention_flops)


class FoldedConv(nn.Module):
    """A convolution with its batch norm folded in, its "same" padding and optional ReLU6 applied by the
    convolution itself: ``relu6?(bn(conv(pad(x))))`` as one oneDNN call on a CPU.

    The folded weight is computed in fp32 and rounded once when the model is cast to bf16; the bias stays
    fp32 (``_apply`` keeps it so), where rounding it would cost more accuracy than the bf16 weights do.
    Under CPU autocast it computes in the autocast dtype, as ``F.conv2d`` would, so training (fp32 weights,
    autocast) sees the features serving (bf16 weights) does. Eager fallback (another device, autograd,
    ``STLLM_FUSED_LINEAR=0``): ``F.conv2d`` then ``F.hardtanh``.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu6: bool, pad: tuple[int, int, int, int]):
        super().__init__()
        with torch.no_grad():
            scale = bn.weight.float() / torch.sqrt(bn.running_var.float() + bn.eps)
            bias = bn.bias.float() - bn.running_mean.float() * scale
            if conv.bias is not None:
                bias = bias + conv.bias.float() * scale
            weight = conv.weight.float() * scale.view(-1, 1, 1, 1)
        self.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
        self.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
        self.stride, self.dilation, self.groups = list(conv.stride), list(conv.dilation), conv.groups
        left, right, top, bottom = pad
        # symmetric padding goes into the convolution; TF-style "same" padding of strided layers is not
        self.padding = [top, left] if (left, top) == (right, bottom) else [0, 0]
        self.pre_pad = None if (left, top) == (right, bottom) else (left, right, top, bottom)
        self.relu6 = relu6

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.bias.dtype != torch.float32:
            self.bias.data = self.bias.data.float()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_pad is not None:
            x = F.pad(x, self.pre_pad)
        weight = self.weight
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):  # as autocast would run a convolution
            dtype = torch.get_autocast_dtype("cpu")
            x, weight = x.to(dtype), weight.to(dtype)
        grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        if x.device.type == "cpu" and x.dtype == weight.dtype and not grad and _onednn_switched_on(x.dtype):
            attr, scalars = ("hardtanh", [0.0, 6.0]) if self.relu6 else ("none", [])
            return torch.ops.mkldnn._convolution_pointwise(
                x,
                weight,
                self.bias,
                self.padding,
                self.stride,
                self.dilation,
                self.groups,
                attr,
                scalars,
                "",
            )
        y = F.conv2d(x, weight, self.bias.to(x.dtype), self.stride, self.padding, self.dilation, self.groups)
        return F.hardtanh(y, 0.0, 6.0) if self.relu6 else y
