"""ST-LLM's own architecture: transformers' ``InstructBlipVideoForConditionalGeneration`` (EVA ViT-g/14,
InstructBLIP's Q-Former with 32 queries that also read an instruction, a linear projection, Vicuna) under the
ST-LLM method, plus the small temporal adapter the released QA model carries inside its ViT.

The temporal adapter is a branch over the ViT's last ``depth`` layers: each branch layer attends across
time at every patch position (output projection zero-initialised, so a fresh adapter changes nothing) and
then within each frame, starting from a learned position per frame (up to 64). Its output is averaged with
the ViT's own last layer before the ViT's final LayerNorm. It sees one clip at a time: the engine hands it each
window's frames on their own, and the global frames on their own, in pieces of at most ``clip_frames`` (16, the
clip length the QA model was trained on), never frames of several windows together.

The Q-Former reads text, as in the original (``qformer_text_input``): in ``stllm eval mc`` the MVBench question
with its options, up to 256 tokens cut from the left; in pre-labeling, asking and rounds, where one video's
tokens serve every label's question, the fixed instruction :data:`JOB_INSTRUCTION` (recorded in the model
spec as ``qformer_text``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from workers.stllm.backbones.base import Backbone

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ADAPTER_FILE = "temporal_adapter.safetensors"
ADAPTER_CONFIG = "temporal_adapter.json"
# The clip length the released QA model's temporal adapter was trained on (num_frames 16 in its configs).
TRAINED_CLIP_FRAMES = 16
# The Q-Former's text limit in the released configs (max_txt_len 256; its tokenizer cuts from the left).
QFORMER_MAX_TEXT = 256
# What the Q-Former reads in jobs. Pre-labeling scores every label's question after the same video tokens, so
# the text cannot be one label's question; the original trained the Q-Former on the human turn of its
# instruction data, whose most common kind is an open request to describe what happens. A neutral request of
# that kind asks the queries for the video's events without favouring any label.
JOB_INSTRUCTION = "What is happening in the video?"


class EvaAttention(nn.Module):
    """EVA-CLIP attention: ``qkv`` without bias plus separate query and value biases (keys have none)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class EvaMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SpatialBlock(nn.Module):
    """A ViT block applied frame by frame to the branch's (cls + patch-major, time-minor) tokens: each
    frame's patches attend with the branch's class token; the class token is then averaged over frames."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int):
        super().__init__()
        # the original builds these blocks with the ViT block's default LayerNorm (eps 1e-5), not the ViT's 1e-6
        self.norm1 = nn.LayerNorm(dim)
        self.attn = EvaAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = EvaMlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        b, n, d = x.shape
        p = (n - 1) // t
        cls = x[:, :1].unsqueeze(1).expand(b, t, 1, d).reshape(b * t, 1, d)
        frames = x[:, 1:].reshape(b, p, t, d).transpose(1, 2).reshape(b * t, p, d)
        y = self.attn(self.norm1(torch.cat([cls, frames], 1)))
        cls_out = y[:, :1].reshape(b, t, 1, d).mean(1)
        patches = y[:, 1:].reshape(b, t, p, d).transpose(1, 2).reshape(b, p * t, d)
        x = x + torch.cat([cls_out, patches], 1)
        return x + self.mlp(self.norm2(x))


class TemporalBlock(nn.Module):
    """Attention across the frames at each patch position; its output projection starts at zero."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EvaAttention(dim, heads)
        self.temporal_fc = nn.Linear(dim, dim)
        nn.init.zeros_(self.temporal_fc.weight)
        nn.init.zeros_(self.temporal_fc.bias)

    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        b, n, d = x.shape
        p = (n - 1) // t
        patches = x[:, 1:]
        y = self.temporal_fc(self.attn(self.norm1(patches.reshape(b * p, t, d))))
        return torch.cat([x[:, :1], patches + y.reshape(b, p * t, d)], 1)


class TemporalAdapter(nn.Module):
    """The branch over the ViT's last ``depth`` layers (see the module docstring)."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, depth: int = 3, max_frames: int = 64):
        super().__init__()
        self.depth, self.max_frames = depth, max_frames
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.temporal = nn.ModuleList(TemporalBlock(dim, heads) for _ in range(depth))
        self.spatial = nn.ModuleList(SpatialBlock(dim, heads, mlp_hidden) for _ in range(depth))
        self.position = nn.Embedding(max_frames, dim)

    def init_spatial_from(self, vit_layers: list[nn.Module]) -> None:
        """Start the spatial blocks from the ViT's last layers (transformers' InstructBlipVideo layer names),
        as the adapter is initialised before training."""
        for block, layer in zip(self.spatial, vit_layers[-self.depth :], strict=True):
            d = block.attn.q_bias.shape[0]
            with torch.no_grad():
                block.norm1.load_state_dict(layer.layer_norm1.state_dict())
                block.norm2.load_state_dict(layer.layer_norm2.state_dict())
                block.attn.qkv.weight.copy_(layer.self_attn.qkv.weight)
                block.attn.q_bias.copy_(layer.self_attn.qkv.bias[:d])
                block.attn.v_bias.copy_(layer.self_attn.qkv.bias[2 * d :])
                block.attn.proj.load_state_dict(layer.self_attn.projection.state_dict())
                block.mlp.load_state_dict(layer.mlp.state_dict())

    def forward(self, layer_outputs: list[torch.Tensor], pos_embed: torch.Tensor, t: int) -> torch.Tensor:
        """layer_outputs: the last ``depth`` ViT layer outputs, each (b*t, 1+p, d); pos_embed (1, 1+p, d).
        Returns the ViT's last layer output merged with the branch, (b*t, 1+p, d)."""
        if t > self.max_frames:
            raise ValueError(f"the temporal adapter takes at most {self.max_frames} frames, got {t}")
        branch = None
        for i, h in enumerate(layer_outputs):
            bt, n, d = h.shape
            b, p = bt // t, n - 1
            x = h.reshape(b, t, n, d)
            cls = x[:, :, 0].mean(1, keepdim=True)  # (b, 1, d)
            patches = x[:, :, 1:]  # (b, t, p, d)
            if branch is None:
                time = self.position(torch.arange(t, device=h.device)).view(1, t, 1, d)
                patches = patches + pos_embed[:, 1:].unsqueeze(1) + time
                cls = (cls + self.cls + pos_embed[:, :1]) / 2
            tokens = torch.cat([cls, patches.transpose(1, 2).reshape(b, p * t, d)], 1)
            if branch is not None:
                tokens = tokens + branch
            branch = self.spatial[i](self.temporal[i](tokens, t), t)
        last = layer_outputs[-1]
        b, n, d = branch.shape[0], last.shape[1], last.shape[2]
        p = n - 1
        cls = branch[:, :1].unsqueeze(1).expand(b, t, 1, d).reshape(b * t, 1, d)
        patches = branch[:, 1:].reshape(b, p, t, d).transpose(1, 2).reshape(b * t, p, d)
        return (last + torch.cat([cls, patches], 1)) / 2


class InstructBlipVideoBackbone(Backbone):
    """``InstructBlipVideoForConditionalGeneration`` from a local directory (a converted ST-LLM release, or
    an InstructBLIP checkpoint), with the Q-Former's own tokenizer in ``qformer_tokenizer/``.

    Features are the ViT's (with the temporal adapter where the directory has one) after its final
    LayerNorm; ``project`` runs the frozen Q-Former (32 queries reading ``instruction``, or the text it is
    handed) and the trainable language projection. Prompt: ``[video]</s>###Human: {question} ###Assistant:
    {answer}``.
    """

    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        from transformers import AutoTokenizer, InstructBlipVideoForConditionalGeneration

        self.spec = dict(spec)
        ref = Path(spec["model"])
        model = InstructBlipVideoForConditionalGeneration.from_pretrained(ref, dtype=torch.float32)
        cfg = model.config
        self.vision = model.vision_model.requires_grad_(False).eval()
        self.qformer = model.qformer.requires_grad_(False).eval()
        self.query_tokens = nn.Parameter(model.query_tokens.detach().clone(), requires_grad=False)
        self.projector = model.language_projection
        self.decoder = model.language_model.model
        self.lm_head = model.language_model.lm_head.requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(ref)
        self.qformer_tokenizer = AutoTokenizer.from_pretrained(ref / "qformer_tokenizer")
        self.qformer_tokenizer.truncation_side = "left"
        self.instruction = spec.get("qformer_text", JOB_INSTRUCTION)
        self.spec["qformer_text"] = (
            self.instruction
        )  # saved with every version: what its tokens were made with
        self.hidden_size = cfg.text_config.hidden_size
        self.image_size = cfg.vision_config.image_size
        self.image_mean, self.image_std = CLIP_MEAN, CLIP_STD
        self.tokens_per_frame = cfg.num_query_tokens
        self.adapter = None
        if (ref / ADAPTER_CONFIG).is_file():
            from safetensors.torch import load_file

            self.adapter = TemporalAdapter(**json.loads((ref / ADAPTER_CONFIG).read_text()))
            self.adapter.load_state_dict(load_file(ref / ADAPTER_FILE), strict=True)
            self.adapter.requires_grad_(False).eval()
            self.clip_frames = int(spec.get("clip_frames", min(TRAINED_CLIP_FRAMES, self.adapter.max_frames)))

    def prompt_parts(self) -> tuple[str, str]:
        return "", " ###Assistant: "

    prompt_mid = "</s>###Human: "

    def vision_features(self, pixels: torch.Tensor, clip: int | None = None) -> torch.Tensor:
        pixels = pixels.to(self.vision.embeddings.patch_embedding.weight.dtype)
        if self.adapter is None:
            return self.vision(pixel_values=pixels).last_hidden_state  # (N, 1+P, Dv), after post_layernorm
        t = clip or pixels.shape[0]
        if pixels.shape[0] % t:
            raise ValueError(f"{pixels.shape[0]} frames do not form clips of {t}")
        out = self.vision(pixel_values=pixels, output_hidden_states=True)
        merged = self.adapter(
            list(out.hidden_states[-self.adapter.depth :]), self.vision.embeddings.position_embedding, t=t
        )
        return self.vision.post_layernorm(merged)

    def project(self, features: torch.Tensor, text: str | None = None) -> torch.Tensor:
        n = features.shape[0]
        queries = self.query_tokens.expand(n, -1, -1).to(features.dtype)
        query_mask = torch.ones(queries.shape[:2], dtype=torch.long, device=features.device)
        kwargs: dict[str, Any] = {"input_ids": None}
        text = self.instruction if text is None else text
        if text:
            text = self.qformer_tokenizer(
                [text] * n, return_tensors="pt", truncation=True, max_length=QFORMER_MAX_TEXT
            ).to(features.device)
            kwargs = {
                "input_ids": text.input_ids,
                "attention_mask": torch.cat([query_mask, text.attention_mask], 1),
            }
        with torch.no_grad():
            out = self.qformer(
                query_embeds=queries,
                encoder_hidden_states=features,
                encoder_attention_mask=torch.ones(
                    features.shape[:2], dtype=torch.long, device=features.device
                ),
                **kwargs,
            ).last_hidden_state[:, : queries.shape[1]]
        return self.projector(out)  # (N, 32, D)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"projector": self.projector}

    def frozen_modules(self) -> list[nn.Module]:
        return [self.vision, self.qformer] + ([self.adapter] if self.adapter is not None else [])
