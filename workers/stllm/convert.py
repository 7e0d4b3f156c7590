"""Convert a released ST-LLM checkpoint into a model directory this project loads (``stllm convert-stllm``).

The release (``farewellthree/ST_LLM_weight/{QA_weight,conversation_weight}``) is one LLaMA-style checkpoint
holding everything: Vicuna under ``model.*``/``lm_head``, and under ``model.stllm_model.*`` the EVA ViT-g
(``visual_encoder``, with the temporal adapter ``BTAdapter_*`` in the QA model), ``ln_vision``, the
Q-Former, ``query_tokens``, ``llama_proj``, the MVM head (``mvm_decoder``) and the global MLP
(``down_proj``/``up_proj``). Every key is renamed into transformers' InstructBlipVideo layout or into this
project's modules, and the load is strict: a key that maps nowhere, or a parameter that no key fills, stops
the conversion with the names listed (the original loader's silent partial load is what this prevents).

Shapes are read from the tensors (hidden sizes, layer counts, image and patch size, query count); head
counts follow the released architectures (EVA ViT-g: 88 per head; BERT Q-Former: 64 per head).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)
PREFIX = "model.stllm_model."
VIT_HEAD_DIM, QFORMER_HEAD_DIM = 88, 64


class ConversionError(ValueError):
    """The checkpoint cannot be converted exactly; the message lists the keys."""


def load_checkpoint(src: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory or file: ``*.safetensors`` or ``*.bin`` (sharded with an index,
    or single). Every shard the index names must be present."""
    src = Path(src)
    files: list[Path]
    if src.is_file():
        files = [src]
    else:
        index = next(
            (
                p
                for p in (src / "model.safetensors.index.json", src / "pytorch_model.bin.index.json")
                if p.is_file()
            ),
            None,
        )
        if index is not None:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [src / n for n in names]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise ConversionError(f"the index {index.name} names shards that are missing: {missing}")
        else:
            files = sorted(src.glob("*.safetensors")) or sorted(src.glob("*.bin"))
    if not files:
        raise ConversionError(f"no .safetensors or .bin checkpoint in {src}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            part = load_file(f)
        else:
            part = torch.load(f, map_location="cpu", weights_only=True)
            part = part.get("model", part) if isinstance(part, dict) else part
        state.update(part)
    return state


def _vit_rename(rest: str) -> str | None:
    """``visual_encoder.*`` (minus the adapter) -> transformers' ``vision_model.*``."""
    fixed = {
        "cls_token": "embeddings.class_embedding",
        "pos_embed": "embeddings.position_embedding",
        "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
        "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    }
    if rest in fixed:
        return "vision_model." + fixed[rest]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", rest)
    if not m:
        return None
    i, tail = m.groups()
    tail = {
        "norm1.weight": "layer_norm1.weight",
        "norm1.bias": "layer_norm1.bias",
        "norm2.weight": "layer_norm2.weight",
        "norm2.bias": "layer_norm2.bias",
        "attn.qkv.weight": "self_attn.qkv.weight",
        "attn.proj.weight": "self_attn.projection.weight",
        "attn.proj.bias": "self_attn.projection.bias",
        "mlp.fc1.weight": "mlp.fc1.weight",
        "mlp.fc1.bias": "mlp.fc1.bias",
        "mlp.fc2.weight": "mlp.fc2.weight",
        "mlp.fc2.bias": "mlp.fc2.bias",
    }.get(tail)
    return f"vision_model.encoder.layers.{i}.{tail}" if tail else None


def _qformer_rename(rest: str) -> str | None:
    """``Qformer.bert.*`` -> transformers' ``qformer.*``."""
    if not rest.startswith("Qformer.bert."):
        return None
    rest = rest[len("Qformer.bert.") :]
    rest = rest.replace("embeddings.LayerNorm.", "embeddings.layernorm.")
    rest = re.sub(r"\.(attention|crossattention)\.self\.", r".\1.attention.", rest)
    return "qformer." + rest


def _adapter_rename(rest: str) -> str | None:
    """``visual_encoder.BTAdapter_*`` -> this project's TemporalAdapter."""
    if rest == "BTAdapter_cls":
        return "cls"
    if rest == "BTAdapter_position.weight":
        return "position.weight"
    m = re.fullmatch(r"BTAdapter_([ST])\.(\d+)\.(.+)", rest)
    if not m:
        return None
    kind, i, tail = m.groups()
    return f"{'spatial' if kind == 'S' else 'temporal'}.{i}.{tail}"


ROTARY_BUFFER = re.compile(r"model\.layers\.(\d+)\.self_attn\.rotary_emb\.inv_freq")


def split_release(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict, dict, dict, list[str]]:
    """(InstructBlipVideo state, adapter state, ST-LLM parts (fusion, MVM head), q/v biases to merge,
    the rotary ``inv_freq`` buffers, keys that map nowhere).

    A release saved with the transformers the original pins (4.28) carries each decoder layer's rotary
    ``inv_freq`` as a buffer; today's transformers computes it from the config, so it is no parameter. Those
    keys are set aside (and checked against the config by :func:`convert_stllm`), not refused."""
    hf, adapter, parts, biases, rotary, unknown = {}, {}, {}, {}, {}, []
    for key, value in state.items():
        if ROTARY_BUFFER.fullmatch(key):
            rotary[key] = value
        elif key == "lm_head.weight":
            hf["language_model.lm_head.weight"] = value
        elif key.startswith(PREFIX):
            rest = key[len(PREFIX) :]
            if rest.startswith("visual_encoder.BTAdapter_"):
                name = _adapter_rename(rest[len("visual_encoder.") :])
                (adapter.__setitem__(name, value) if name else unknown.append(key))
            elif m := re.fullmatch(r"visual_encoder\.blocks\.(\d+)\.attn\.(q_bias|v_bias)", rest):
                biases.setdefault(int(m.group(1)), {})[m.group(2)] = value
            elif rest.startswith("visual_encoder."):
                name = _vit_rename(rest[len("visual_encoder.") :])
                (hf.__setitem__(name, value) if name else unknown.append(key))
            elif rest.startswith("ln_vision."):
                hf["vision_model.post_layernorm." + rest[len("ln_vision.") :]] = value
            elif rest.startswith("Qformer."):
                name = _qformer_rename(rest)
                if rest.endswith("embeddings.position_ids"):
                    continue  # a buffer of arange values, rebuilt by transformers
                (hf.__setitem__(name, value) if name else unknown.append(key))
            elif rest == "query_tokens":
                hf["query_tokens"] = value
            elif rest.startswith("llama_proj."):
                hf["language_projection." + rest[len("llama_proj.") :]] = value
            elif rest.startswith("mvm_decoder."):
                parts["mvm_head." + rest[len("mvm_decoder.") :].replace("head.", "proj.")] = value
            elif rest.startswith(("down_proj.", "up_proj.")):
                parts["fusion." + rest.replace("_proj.", ".", 1)] = value
            elif rest == "embed_tokens.weight":
                parts["_alias_embed_tokens"] = value  # the LLM's embeddings, shared under a second name
            else:
                unknown.append(key)
        elif key.startswith("model."):
            hf["language_model." + key] = value
        else:
            unknown.append(key)
    return hf, adapter, parts, biases, rotary, unknown


def _count(state: dict, pattern: str) -> int:
    idx = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(idx) + 1 if idx else 0


def _config(hf: dict, text_config: dict):
    from transformers import InstructBlipVideoConfig

    vit_dim = hf["vision_model.embeddings.class_embedding"].shape[-1]
    patch = hf["vision_model.embeddings.patch_embedding.weight"].shape[-1]
    n_pos = hf["vision_model.embeddings.position_embedding"].shape[1]
    side = round((n_pos - 1) ** 0.5) * patch
    q_dim = hf["query_tokens"].shape[-1]
    q_layers = _count(hf, r"qformer\.encoder\.layer\.(\d+)\.")
    cross = sorted(
        {int(m.group(1)) for k in hf if (m := re.match(r"qformer\.encoder\.layer\.(\d+)\.crossattention", k))}
    )
    return InstructBlipVideoConfig(
        vision_config={
            "hidden_size": vit_dim,
            "intermediate_size": hf["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            "num_hidden_layers": _count(hf, r"vision_model\.encoder\.layers\.(\d+)\."),
            "num_attention_heads": max(1, vit_dim // VIT_HEAD_DIM),
            "image_size": side,
            "patch_size": patch,
            "layer_norm_eps": 1e-6,
            "qkv_bias": True,
        },
        qformer_config={
            "hidden_size": q_dim,
            "num_hidden_layers": q_layers,
            "num_attention_heads": max(1, q_dim // QFORMER_HEAD_DIM),
            "intermediate_size": hf["qformer.encoder.layer.0.intermediate_query.dense.weight"].shape[0],
            "vocab_size": hf["qformer.embeddings.word_embeddings.weight"].shape[0],
            "max_position_embeddings": hf["qformer.embeddings.position_embeddings.weight"].shape[0],
            "cross_attention_frequency": cross[1] - cross[0] if len(cross) > 1 else max(1, q_layers),
            "encoder_hidden_size": vit_dim,
        },
        text_config={
            **text_config,
            "model_type": "llama",
            "vocab_size": hf["language_model.model.embed_tokens.weight"].shape[0],
        },
        num_query_tokens=hf["query_tokens"].shape[1],
    )


def _check_rotary(rotary: dict[str, torch.Tensor], text_config) -> None:
    """The release's rotary buffers must be what the converted config computes, or positions would differ."""
    if not rotary:
        return
    head_dim = getattr(text_config, "head_dim", None) or (
        text_config.hidden_size // text_config.num_attention_heads
    )
    params = getattr(text_config, "rope_parameters", None) or {}
    theta = float(params.get("rope_theta", getattr(text_config, "rope_theta", 10000.0)))
    expected = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wrong = sorted(
        k for k, v in rotary.items() if v.shape != expected.shape or not torch.allclose(v.double(), expected)
    )
    if wrong:
        raise ConversionError(f"rotary inv_freq buffers differ from rope_theta {theta:g}: {wrong}")
    log.info("dropped %d rotary inv_freq buffers (recomputed from rope_theta %g)", len(rotary), theta)


def _release_tokenizer(src: Path):
    """The release's Vicuna tokenizer as the original reads it: ``LlamaTokenizer``, legacy (text after a
    special token such as ``</s>`` starts a new SentencePiece piece: ``</s>###`` is ``</s>``, ``▁###``).
    By class, not ``AutoTokenizer``: the release's ``config.json`` names ``model_type: st_llm_hf``, which no
    auto class knows (without a ``tokenizer_class`` it would give a generic, non-legacy tokenizer)."""
    from transformers import LlamaTokenizer

    try:
        return LlamaTokenizer.from_pretrained(src, legacy=True)
    except Exception as e:  # no tokenizer.model / tokenizer.json, or sentencepiece missing
        raise ConversionError(f"cannot read the release's Llama tokenizer in {src}: {e}") from e


def convert_stllm(
    src: str | Path,
    dst: str | Path,
    qformer_tokenizer: str = "bert-base-uncased",
    version: str = "st-llm",
) -> Path:
    """Convert the checkpoint in ``src`` (its config.json, tokenizer files and weights) into the model
    directory ``dst``. ``qformer_tokenizer``: the Q-Former's BERT tokenizer (hub id or local path; the
    release does not ship it). Raises ConversionError naming every key that does not map exactly."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, InstructBlipVideoForConditionalGeneration

    from workers.stllm.backbones.instructblip import ADAPTER_CONFIG, ADAPTER_FILE, TemporalAdapter
    from workers.stllm.io import MODEL_FILE
    from workers.stllm.model import GlobalLocalFusion, MVMHead, STLLMConfig

    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise ConversionError(f"{dst} already exists")
    state = load_checkpoint(src)
    hf, adapter_state, parts, biases, rotary, unknown = split_release(state)
    for i, b in sorted(biases.items()):
        if set(b) != {"q_bias", "v_bias"}:
            unknown += [f"{PREFIX}visual_encoder.blocks.{i}.attn.{k}" for k in b]
            continue
        hf[f"vision_model.encoder.layers.{i}.self_attn.qkv.bias"] = torch.cat(
            [b["q_bias"], torch.zeros_like(b["q_bias"]), b["v_bias"]]
        )
    alias = parts.pop("_alias_embed_tokens", None)
    if alias is not None and not torch.equal(
        alias, hf.get("language_model.model.embed_tokens.weight", alias)
    ):
        raise ConversionError(f"{PREFIX}embed_tokens.weight differs from model.embed_tokens.weight")
    if unknown:
        raise ConversionError(f"{len(unknown)} keys map to nothing: {sorted(unknown)}")
    text_config = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else {}
    text_config = {
        k: v for k, v in text_config.items() if k not in ("architectures", "model_type", "auto_map")
    }
    try:
        config = _config(hf, text_config)
    except KeyError as e:
        raise ConversionError(f"the checkpoint lacks {e}, needed to read the architecture") from e
    _check_rotary(rotary, config.text_config)

    with torch.device("meta"):  # no random initialisation of billions of weights only to overwrite them
        model = InstructBlipVideoForConditionalGeneration(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(hf))
    extra = sorted(set(hf) - set(expected))
    wrong = sorted(k for k in set(expected) & set(hf) if tuple(hf[k].shape) != tuple(expected[k]))
    if missing or extra or wrong:
        raise ConversionError(
            "the checkpoint does not fill the architecture exactly: "
            + "; ".join(
                f"{what}: {names}"
                for what, names in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong))
                if names
            )
        )
    model.load_state_dict(hf, strict=True, assign=True)

    adapter, adapter_cfg = None, None
    if adapter_state:
        try:
            adapter_cfg = {
                "dim": config.vision_config.hidden_size,
                "heads": config.vision_config.num_attention_heads,
                "mlp_hidden": adapter_state["spatial.0.mlp.fc1.weight"].shape[0],
                "depth": _count(adapter_state, r"spatial\.(\d+)\."),
                "max_frames": adapter_state["position.weight"].shape[0],
            }
        except KeyError as e:
            raise ConversionError(f"temporal adapter: missing {e}") from e
        adapter = TemporalAdapter(**adapter_cfg)
        result = adapter.load_state_dict(adapter_state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ConversionError(
                f"temporal adapter: missing {sorted(result.missing_keys)}, "
                f"unexpected {sorted(result.unexpected_keys)}"
            )

    tok = _release_tokenizer(src)
    if "[PAD]" not in tok.get_vocab():  # the original adds [PAD] (vocabulary 32001) for batching
        tok.add_special_tokens({"pad_token": "[PAD]"})
    if len(tok) != config.text_config.vocab_size:
        raise ConversionError(
            f"the tokenizer has {len(tok)} tokens but the LLM's embeddings {config.text_config.vocab_size}"
        )

    backbone_dir = dst.with_name(dst.name + ".backbone.tmp")
    shutil.rmtree(backbone_dir, ignore_errors=True)
    model.save_pretrained(backbone_dir)
    tok.save_pretrained(backbone_dir)
    # saved tokenizer configs do not say "legacy"; without it a reload splits text after `</s>` differently
    tok_config = backbone_dir / "tokenizer_config.json"
    tok_config.write_text(json.dumps({**json.loads(tok_config.read_text()), "legacy": True}, indent=2))
    qtok = AutoTokenizer.from_pretrained(qformer_tokenizer, truncation_side="left")
    if qtok.bos_token is None:
        qtok.add_special_tokens({"bos_token": "[DEC]"})  # as InstructBLIP's Q-Former tokenizer
    qtok.save_pretrained(backbone_dir / "qformer_tokenizer")
    if adapter is not None:
        save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, backbone_dir / ADAPTER_FILE)
        (backbone_dir / ADAPTER_CONFIG).write_text(json.dumps(adapter_cfg))
    # the model directory: stllm.json + the trainable parts, written directly (loading an 8B backbone again
    # just to save its projector would need tens of GB)
    d_model = config.text_config.hidden_size
    bottleneck = parts["fusion.down.weight"].shape[0] if "fusion.down.weight" in parts else min(1024, d_model)
    fusion, mvm = GlobalLocalFusion(d_model, bottleneck), MVMHead(d_model)
    for name, module in (("fusion", fusion), ("mvm_head", mvm)):
        sub = {k[len(name) + 1 :]: v for k, v in parts.items() if k.startswith(name + ".")}
        if sub:
            module.load_state_dict(sub, strict=True)
    trainable = {f"projector.{k}": v for k, v in model.language_projection.state_dict().items()}
    trainable |= {f"fusion.{k}": v for k, v in fusion.state_dict().items()}
    trainable |= {f"mvm_head.{k}": v for k, v in mvm.state_dict().items()}
    meta = {
        "backbone": {"kind": "instructblip-video", "model": "backbone"},
        # the release's global MLP was trained on the mean of projected tokens
        "config": dataclasses.asdict(
            STLLMConfig(global_bottleneck=fusion.down.out_features, global_mean="tokens")
        ),
        "version": version,
    }
    save_file({k: v.detach().contiguous() for k, v in trainable.items()}, backbone_dir / "trainable.tmp")
    dst.mkdir(parents=True)
    (backbone_dir / "trainable.tmp").rename(dst / "trainable.safetensors")
    backbone_dir.rename(dst / "backbone")
    (dst / MODEL_FILE).write_text(json.dumps(meta, indent=2))  # last: a directory with it is complete
    return dst
