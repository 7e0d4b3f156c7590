"""Tiny random backbones built from configs: no download, seconds to build. Tests and benches use them.

Each builder writes transformers model directories under ``directory`` and returns the backbone spec
that loads them, so a tiny model goes through exactly the loading code a real one does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def byte_tokenizer():
    """A byte-level tokenizer (259 ids: 256 bytes + <s>, </s>, <pad>); every string is encodable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    for special in ("<s>", "</s>", "<pad>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _tiny_llama_config(tokenizer, hidden: int = 64, layers: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=0.1,
    )


def tiny_composed(directory: str | Path, seed: int = 0, hidden: int = 64, grid: int = 2) -> dict[str, Any]:
    """A tiny CLIP vision tower (32 px, 16 patches) + a 2-layer Llama; returns its composed spec."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaForCausalLM

    directory = Path(directory)
    torch.manual_seed(seed)
    tok = byte_tokenizer()
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    )
    lm = LlamaForCausalLM(_tiny_llama_config(tok, hidden))
    vision.save_pretrained(directory / "vision")
    lm.save_pretrained(directory / "lm")
    tok.save_pretrained(directory / "lm")
    return {
        "kind": "composed",
        "vision": str(directory / "vision"),
        "lm": str(directory / "lm"),
        "grid": grid,
    }


def smolvlm_config(
    text_hidden: int = 64, text_layers: int = 2, vision_hidden: int = 32, image_size: int = 64
):
    """A SmolVLM-shaped config at toy size: SigLIP vision, pixel-shuffle connector (scale 2), Llama text."""
    from transformers import SmolVLMConfig

    tok = byte_tokenizer()
    return SmolVLMConfig(
        vision_config={
            "hidden_size": vision_hidden,
            "intermediate_size": vision_hidden * 2,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 16,
        },
        text_config=_tiny_llama_config(tok, text_hidden, text_layers).to_dict(),
        scale_factor=2,
        image_token_id=tok.pad_token_id,
    ), tok


def tiny_smolvlm(directory: str | Path, seed: int = 0, **config_kwargs) -> dict[str, Any]:
    """A random SmolVLM2-architecture model saved under ``directory``; returns its smolvlm2 spec."""
    from transformers import SmolVLMForConditionalGeneration

    directory = Path(directory)
    torch.manual_seed(seed)
    config, tok = smolvlm_config(**config_kwargs)
    model = SmolVLMForConditionalGeneration(config)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return {"kind": "smolvlm2", "model": str(directory)}
