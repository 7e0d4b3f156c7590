"""The interface every backbone family implements, and what they share."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _split_chat_template(tokenizer) -> tuple[str, str]:
    """(head, tail) of a one-turn user prompt: ``head + question + tail`` then the answer.

    Taken from the tokenizer's chat template where it has one, so instruct models see their own format.
    """
    if getattr(tokenizer, "chat_template", None):
        marker = "\x00QUESTION\x00"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": marker}], add_generation_prompt=True, tokenize=False
        )
        head, tail = text.split(marker)
        return head, tail
    return "Question: ", "\nAnswer: "


class Backbone(nn.Module):
    """The interface every backbone family implements (see the module docstring)."""

    spec: dict[str, Any]
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    tokens_per_frame: int
    hidden_size: int
    tokenizer: Any
    decoder: nn.Module
    lm_head: nn.Module

    # The most frames the encoder mixes over time in one clip (a temporal adapter: the clip length it was
    # trained on). None: every frame is encoded on its own, so a frame that several windows share is encoded once.
    clip_frames: int | None = None
    # The connector reads each token's change since the previous frame beside the token (see
    # STLLM.video_tokens): a temporal signal for an encoder that sees every frame alone.
    motion_input: bool = False
    # ... as its absolute value (the spec's ``"motion": "magnitude"``) rather than signed.
    motion_magnitude: bool = False

    def vision_features(self, pixels: torch.Tensor, clip: int | None = None) -> torch.Tensor:
        """(N, 3, S, S) -> (N, K, Dv). ``clip``: the frames form N / clip consecutive clips of ``clip`` frames
        (only an encoder with ``clip_frames`` reads it; None: one clip)."""
        raise NotImplementedError

    def project(self, features: torch.Tensor, text: str | None = None) -> torch.Tensor:
        """(N, K, Dv) -> (N, K', D). ``text``: what a question-aware connector (InstructBLIP's Q-Former) reads
        instead of its fixed instruction; others ignore it."""
        raise NotImplementedError

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Non-LoRA parts that fine-tuning trains and a model directory saves (the connector)."""
        raise NotImplementedError

    def frozen_modules(self) -> list[nn.Module]:
        """Frozen parts that stay in eval mode while the rest trains (their dropout off, as the original pins
        them)."""
        return [self.vision]

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.get_input_embeddings()(ids)

    # Text between the video and the question (most backbones: none).
    prompt_mid: str = ""

    def prompt_parts(self) -> tuple[str, str]:
        return _split_chat_template(self.tokenizer)


def contiguous_embeddings(vision: nn.Module) -> None:
    """Make a ViT's patch embeddings contiguous as they leave the embedding layer.

    SigLIP-style embeddings are ``conv(pixels).flatten(2).transpose(1, 2)``: a channels-first view. Element-wise
    ops keep their input's layout, so without this the whole residual stream stays transposed and every
    layer norm copies it first: 15% of SigLIP's time on a CPU.
    """
    for name, module in vision.named_modules():
        if name.split(".")[-1] == "embeddings":
            module.register_forward_hook(lambda _module, _inputs, output: output.contiguous())
            return
