"""What the benchmark scripts share: the SmolVLM2-256M shape built offline, and a recorder of attention calls.
Scripts import it as a sibling module (``from common import ...``), run from the repository root."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from workers.stllm.cpu import kernels  # noqa: F401  (registers torch.ops.stllm.tile_attention)

LABELS = ["jam", "hand", "defect", "part_passing", "empty_line"]
SMOLVLM2_500M = {
    "text": {
        "hidden_size": 960,
        "intermediate_size": 2560,
        "num_hidden_layers": 32,
        "num_attention_heads": 15,
        "num_key_value_heads": 5,
        "vocab_size": 49280,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    "vision": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 512,
        "patch_size": 16,
    },
    "scale_factor": 4,  # 1024 patches -> 64 tokens per frame
}
# HuggingFaceTB/SmolVLM2-256M-Video-Instruct, config.json: SigLIP-B/16 at 512 px + SmolLM2-135M
SMOLVLM2_256M = {
    "text": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49280,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    "vision": SMOLVLM2_500M["vision"],
    "scale_factor": 4,
}


def build(values: dict, directory: Path) -> dict:
    from transformers import LlamaConfig, SmolVLMConfig, SmolVLMForConditionalGeneration

    from workers.schemas import parse_labels
    from workers.stllm.testing import word_tokenizer

    torch.manual_seed(0)
    tok = word_tokenizer([label.question() for label in parse_labels(LABELS)])
    text = LlamaConfig(
        **values["text"],
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config = SmolVLMConfig(
        vision_config=values["vision"],
        text_config=text.to_dict(),
        scale_factor=values["scale_factor"],
        image_token_id=tok.pad_token_id,
    )
    SmolVLMForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(directory)
    tok.save_pretrained(directory)
    return {"kind": "smolvlm2", "model": str(directory)}


ATTENTION_OPS = {  # the composite op too: under inference_mode a dispatch mode sees it before it decomposes
    torch.ops.stllm.tile_attention,  # vision tower and decoder scoring on CPUs with AMX
    torch.ops.aten.scaled_dot_product_attention,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
    torch.ops.aten._scaled_dot_product_flash_attention,
    torch.ops.aten._scaled_dot_product_efficient_attention,
}


MASK_FOURTH = {
    torch.ops.aten.scaled_dot_product_attention,
    torch.ops.aten._scaled_dot_product_efficient_attention,
}


def blocked_flops(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> float:
    """FLOPs an attention call spends on scores its mask blocks (4 per score: Q K^T and P V, as torch counts
    attention), which the kernel computes and throws away: not the model's work, so not counted."""
    if mask is None:
        return 0.0
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    scores = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
    return 4.0 * q.shape[-1] * scores * (1.0 - allowed.float().mean().item())


class AttentionCalls(TorchDispatchMode):
    """Records every attention kernel call's arguments as shapes (tensors replaced by their layout), so the
    same calls can be replayed on their own, and the FLOPs their masks block."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []
        self.blocked = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in ATTENTION_OPS:
            layout = lambda a: ("tensor", a.shape, a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a  # noqa: E731
            self.calls.append(
                (func, tuple(map(layout, args)), tuple((k, layout(v)) for k, v in kwargs.items()))
            )
            # the composite op and the CUDA memory-efficient kernel take the mask 4th, the tile kernel 5th;
            # the others by keyword
            if func.overloadpacket is torch.ops.stllm.tile_attention:
                mask = args[4] if len(args) > 4 else kwargs.get("mask")
            elif func.overloadpacket in MASK_FOURTH:
                mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            else:
                mask = kwargs.get("attn_mask")
            self.blocked += blocked_flops(args[0], args[1], mask if isinstance(mask, torch.Tensor) else None)
        return func(*args, **kwargs)
