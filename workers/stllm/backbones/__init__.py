"""Backbones: one small class per model family, one interface.

A backbone turns frames into per-frame tokens in the language model's embedding space and owns the
language model (decoder + head) and its tokenizer:

    pixels (N, 3, S, S) --vision_features--> (N, K, Dv)   frozen, cacheable
                        --project---------> (N, K, D)    trainable connector/projector
    decoder(inputs_embeds (B, L, D), cache=...) -> last_hidden_state (B, L, D)
    lm_head(hidden) -> logits

A backbone is described by a JSON ``spec`` (names, hub ids or local paths) so that a saved model directory
can rebuild it from its base reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workers.stllm.backbones.base import Backbone
from workers.stllm.backbones.composed import BUILTIN_SPEC, ComposedBackbone
from workers.stllm.backbones.instructblip import InstructBlipVideoBackbone
from workers.stllm.backbones.smolvlm2 import SmolVLM2Backbone

BACKBONES: dict[str, type[Backbone]] = {
    "composed": ComposedBackbone,
    "smolvlm2": SmolVLM2Backbone,
    "instructblip-video": InstructBlipVideoBackbone,
}


def resolve_spec(name_or_spec: str | dict[str, Any]) -> dict[str, Any]:
    """A backbone spec from what a user types: 'builtin', a SmolVLM2 hub id or local path, or a spec dict."""
    if isinstance(name_or_spec, dict):
        return name_or_spec
    if name_or_spec == "builtin":
        return dict(BUILTIN_SPEC)
    config = Path(name_or_spec) / "config.json"
    if "smolvlm" in name_or_spec.lower() or (config.exists() and '"smolvlm"' in config.read_text()):
        return {"kind": "smolvlm2", "model": name_or_spec}
    if config.exists() and '"instructblipvideo"' in config.read_text():
        return {"kind": "instructblip-video", "model": name_or_spec}
    raise ValueError(
        f"unknown model {name_or_spec!r}: use 'builtin', a SmolVLM2 hub id "
        "(e.g. HuggingFaceTB/SmolVLM2-500M-Video-Instruct), or a saved stllm model directory"
    )


def build_backbone(spec: dict[str, Any], cache_dir: Path | None = None) -> Backbone:
    """Instantiate a backbone from its spec; ``cache_dir`` holds converted shipped weights (builtin)."""
    kind = spec.get("kind")
    if kind not in BACKBONES:
        raise ValueError(f"unknown backbone kind {kind!r}; known: {sorted(BACKBONES)}")
    if kind == "composed":
        return ComposedBackbone(spec, cache_dir)
    return BACKBONES[kind](spec)
