"""SmolVLM2 (256M/500M/2.2B Video-Instruct): the recommended real model."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from workers.stllm.backbones.base import Backbone, contiguous_embeddings


class SmolVLM2Backbone(Backbone):
    """``SmolVLMForConditionalGeneration`` (SmolVLM2 256M/500M/2.2B Video-Instruct) by hub id or local path.

    Each frame is one 512 px image: SigLIP patches -> pixel-shuffle connector -> 64 tokens (81 for 2.2B).
    The connector is the trainable projector; the LM is SmolVLM's text model.
    """

    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        from transformers import AutoTokenizer, SmolVLMForConditionalGeneration

        self.spec = dict(spec)
        ref = spec["model"]
        model = SmolVLMForConditionalGeneration.from_pretrained(ref, dtype=torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(ref)
        cfg = model.config
        self.vision = model.model.vision_model.requires_grad_(False).eval()
        contiguous_embeddings(self.vision)
        self.connector = model.model.connector
        self.decoder = model.model.text_model
        self.lm_head = model.lm_head.requires_grad_(False)
        self.hidden_size = cfg.text_config.hidden_size
        self.image_size = cfg.vision_config.image_size
        self.image_mean, self.image_std = self._normalisation(ref)
        patches = (self.image_size // cfg.vision_config.patch_size) ** 2
        self.tokens_per_frame = patches // (cfg.scale_factor**2)

    @staticmethod
    def _normalisation(ref: str) -> tuple[tuple, tuple]:
        try:
            from transformers import AutoImageProcessor

            proc = AutoImageProcessor.from_pretrained(ref)
            return tuple(proc.image_mean), tuple(proc.image_std)
        except Exception:  # no preprocessor_config.json: SmolVLM's own values
            return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    def vision_features(self, pixels: torch.Tensor, clip: int | None = None) -> torch.Tensor:
        return self.vision(pixel_values=pixels.to(self.vision.dtype)).last_hidden_state  # (N, P, Dv)

    def project(self, features: torch.Tensor, text: str | None = None) -> torch.Tensor:
        return self.connector(features)  # (N, K, D)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"connector": self.connector}
