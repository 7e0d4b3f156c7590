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


# What the tiny Vicuna-style tokenizer is trained on: the prompts the engine and the MVBench harness build.
_LLAMA_CORPUS = [
    "###Human: what is happening in the video? ###Assistant: yes no",
    "Carefully watch the video and pay attention to the cause and sequence of events, the detail and movement "
    "of objects, and the action and pose of persons.",
    "Question: Which event happens first in the video?\nOptions:\n(A) jam\n(B) hand\n(C) part passing\n"
    "(D) empty belt\nOnly give the best option.",
    "Best option:(A) How many parts pass on the conveyor? Is the line jammed? Does this clip show a defect?",
]


def llama_tokenizer(directory: str | Path) -> Path:
    """A Vicuna-style tokenizer at toy size, written as such a release ships it: a SentencePiece BPE model
    (``tokenizer.model``: byte fallback, a dummy prefix, whitespace kept; <unk> 0, <s> 1, </s> 2) and a
    ``tokenizer_config.json`` naming ``LlamaTokenizer``. Trained offline here (no download). Returns the
    ``tokenizer.model`` path, for reading it with ``sentencepiece`` directly as the original's slow tokenizer
    did."""
    import io
    import json

    import sentencepiece as spm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_LLAMA_CORPUS * 40),
        model_writer=model,
        vocab_size=340,
        model_type="bpe",
        byte_fallback=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
        num_threads=1,
    )
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
            }
        )
    )
    return directory / "tokenizer.model"


def word_tokenizer(texts: list[str]):
    """:func:`byte_tokenizer` plus "yes", "no" and every word of ``texts`` as single tokens, so prompts made
    of those words are about as many tokens as a real BPE vocabulary makes of them (bytes alone make them
    3-4x longer, and benchmarks would measure text rather than video)."""
    tok = byte_tokenizer()
    tok.add_tokens(["yes", "no"])
    tok.add_tokens(sorted({w for text in texts for w in text.replace("?", " ?").split()}))
    return tok


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


def bert_tokenizer(directory: str | Path):
    """A small BERT WordPiece tokenizer (lower-case letters, digits and a few words), saved under
    ``directory``: the Q-Former's tokenizer at toy size."""
    from transformers import BertTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += list("abcdefghijklmnopqrstuvwxyz0123456789?.,!'()")
    words += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    words += ["the", "what", "video", "does", "is", "happen", "first", "how", "many"]
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    tok.save_pretrained(directory)
    return tok


def tiny_instructblip_video_config(vocab_size: int, qformer_vocab: int, image_size: int = 28):
    """InstructBlipVideo at toy size, with the released models' head widths (ViT 88, Q-Former 64 per head);
    Vicuna's special ids (<s> 1, </s> 2)."""
    from transformers import InstructBlipVideoConfig

    text = _tiny_llama_config(byte_tokenizer(), 64, 2).to_dict()
    text.update(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    return InstructBlipVideoConfig(
        vision_config={
            "hidden_size": 176,
            "intermediate_size": 352,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 14,
            "layer_norm_eps": 1e-6,
        },
        qformer_config={
            "hidden_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 256,
            "vocab_size": qformer_vocab,
            "encoder_hidden_size": 176,
            "cross_attention_frequency": 1,
        },
        text_config=text,
        num_query_tokens=4,
    )


def _release_names(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' InstructBlipVideo names -> the ST-LLM release's names (the converter's inverse)."""
    import re

    out = {}
    p = "model.stllm_model."
    for k, v in hf_state.items():
        if k.startswith("language_model.model."):
            out["model." + k[len("language_model.model.") :]] = v
        elif k == "language_model.lm_head.weight":
            out["lm_head.weight"] = v
        elif k == "query_tokens":
            out[p + "query_tokens"] = v
        elif k.startswith("language_projection."):
            out[p + "llama_proj." + k.split(".", 1)[1]] = v
        elif k.startswith("vision_model.post_layernorm."):
            out[p + "ln_vision." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("vision_model.embeddings."):
            name = {
                "class_embedding": "cls_token",
                "position_embedding": "pos_embed",
                "patch_embedding.weight": "patch_embed.proj.weight",
                "patch_embedding.bias": "patch_embed.proj.bias",
            }[k[len("vision_model.embeddings.") :]]
            out[p + "visual_encoder." + name] = v
        elif m := re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.(.+)", k):
            i, tail = m.groups()
            base = f"{p}visual_encoder.blocks.{i}."
            if tail == "self_attn.qkv.bias":
                d = v.shape[0] // 3
                out[base + "attn.q_bias"], out[base + "attn.v_bias"] = v[:d], v[2 * d :]
                continue
            tail = tail.replace("layer_norm", "norm").replace("self_attn.projection", "attn.proj")
            out[base + tail.replace("self_attn.", "attn.")] = v
        elif k.startswith("qformer."):
            rest = k[len("qformer.") :].replace("embeddings.layernorm.", "embeddings.LayerNorm.")
            rest = re.sub(r"\.(attention|crossattention)\.attention\.", r".\1.self.", rest)
            out[p + "Qformer.bert." + rest] = v
        else:
            raise KeyError(k)
    return out


def tiny_stllm_release(directory: str | Path, adapter: bool = True, seed: int = 0) -> dict[str, Any]:
    """A checkpoint laid out as the ST-LLM release at toy size, with random weights: two ``.bin`` shards with
    an index, ``config.json`` (``model_type: st_llm_hf``) and the LLaMA-side tokenizer. Returns the
    modules its weights came from (``hf``: InstructBlipVideo, ``adapter``, ``fusion``, ``mvm``) and the
    Q-Former tokenizer's folder, for comparing a converted model against a direct forward."""
    import json

    from transformers import InstructBlipVideoForConditionalGeneration

    from workers.stllm.backbones.instructblip import TemporalAdapter
    from workers.stllm.model import GlobalLocalFusion, MVMHead

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    sp_model = llama_tokenizer(directory)  # tokenizer.model + tokenizer_config.json, as Vicuna's release
    import sentencepiece as spm

    n_text = (
        spm.SentencePieceProcessor(model_file=str(sp_model)).get_piece_size() + 1
    )  # + the original's [PAD]
    qtok_dir = directory.parent / (directory.name + "-qformer-tokenizer")
    qtok = bert_tokenizer(qtok_dir)
    config = tiny_instructblip_video_config(n_text, len(qtok))
    hf = InstructBlipVideoForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in hf.parameters():  # visible weights everywhere (defaults leave LayerNorms and biases trivial)
            p.add_(torch.randn_like(p) * 0.05)
    state = _release_names(hf.state_dict())
    mods: dict[str, Any] = {"hf": hf, "qformer_tokenizer": str(qtok_dir)}
    if adapter:
        a = TemporalAdapter(176, 2, 352, depth=3, max_frames=64).eval()
        with torch.no_grad():
            for p in a.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        mods["adapter"] = a
        for k, v in a.state_dict().items():
            name = {"cls": "BTAdapter_cls", "position.weight": "BTAdapter_position.weight"}.get(k)
            if name is None:
                kind, rest = k.split(".", 1)
                name = f"BTAdapter_{'S' if kind == 'spatial' else 'T'}.{rest}"
            state["model.stllm_model.visual_encoder." + name] = v
    fusion, mvm = GlobalLocalFusion(64, 32), MVMHead(64)
    with torch.no_grad():
        fusion.up.weight.normal_(0, 0.05)
    mods["fusion"], mods["mvm"] = fusion, mvm
    for k, v in fusion.state_dict().items():
        state[f"model.stllm_model.{k.split('.')[0]}_proj.{k.split('.')[1]}"] = v
    for k, v in mvm.state_dict().items():
        state["model.stllm_model.mvm_decoder." + k.replace("proj.", "head.")] = v
    state["model.stllm_model.embed_tokens.weight"] = state["model.embed_tokens.weight"]
    names = sorted(state)
    half = len(names) // 2
    shards = {
        "pytorch_model-00001-of-00002.bin": names[:half],
        "pytorch_model-00002-of-00002.bin": names[half:],
    }
    for file, keys in shards.items():
        torch.save({k: state[k].clone() for k in keys}, directory / file)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    text = config.text_config.to_dict()
    (directory / "config.json").write_text(json.dumps({**text, "model_type": "st_llm_hf"}))
    mods["sentencepiece"] = str(sp_model)
    return mods


@torch.inference_mode()
def score_naive(
    model, video: torch.Tensor, queries: list[str], candidates: list[str], answer_prefix: str = ""
) -> torch.Tensor:
    """Reference for ``STLLM.score``: one full forward per (video, query, candidate), no cache."""
    b = video.shape[0]
    out = torch.zeros(b, len(queries), len(candidates))
    head = model._head_embeds(1)
    for bi in range(b):
        for qi, q in enumerate(queries):
            for ci, c in enumerate(candidates):
                context = model.question_ids(q, answer_prefix)
                cand = model.text_ids(c)
                ids = torch.tensor([context + cand])
                with model.autocast():
                    vid = video[bi : bi + 1].to(model.device)
                    x = torch.cat([head.to(vid.dtype), vid, model.embed(ids).to(vid.dtype)], 1)
                    hidden = model.lm(inputs_embeds=x).last_hidden_state[0]
                start = head.shape[1] + video.shape[1] + len(context) - 1
                logp = model.backbone.lm_head(hidden[start : start + len(cand)]).float().log_softmax(-1)
                out[bi, qi, ci] = logp.gather(1, torch.tensor(cand, device=logp.device).unsqueeze(1)).sum()
    return out
