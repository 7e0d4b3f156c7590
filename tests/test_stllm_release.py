"""ST-LLM as published: converting a release checkpoint (written here at toy size with the original key names)
strictly, the converted model against a direct forward of the same weights, and the multiple-choice harness."""

from __future__ import annotations

import json
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workers.stllm.backbones.instructblip import JOB_INSTRUCTION
from workers.stllm.convert import ConversionError, convert_stllm, load_checkpoint
from workers.stllm.io import load_model
from workers.stllm.testing import tiny_stllm_release
from workers.tools.mc import evaluate_mc, line_video_questions, load_questions


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    d = tmp_path_factory.mktemp("release")
    mods = tiny_stllm_release(d / "QA_weight")
    return d / "QA_weight", mods


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    src, mods = release
    return convert_stllm(src, tmp_path_factory.mktemp("conv") / "st-llm-qa", mods["qformer_tokenizer"])


def test_release_converts_and_matches_a_direct_forward(release, converted):
    _, mods = release
    model = load_model(converted, device="cpu", dtype="fp32")
    bb = model.backbone
    assert type(bb).__name__ == "InstructBlipVideoBackbone" and bb.adapter is not None
    assert model.version == "st-llm" and bb.tokens_per_frame == 4
    hf, adapter = mods["hf"], mods["adapter"]
    pixels = torch.randn(6, 3, 28, 28)
    with torch.no_grad():
        features = bb.vision_features(pixels)
        hidden = hf.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
        direct = hf.vision_model.post_layernorm(
            adapter(list(hidden[-3:]), hf.vision_model.embeddings.position_embedding, t=6)
        )
        assert torch.allclose(features, direct, atol=1e-5)
        # the adapter is not a no-op here: without it the features differ
        assert not torch.allclose(features, hf.vision_model(pixel_values=pixels).last_hidden_state, atol=1e-3)
        queries = hf.qformer(
            None,
            query_embeds=hf.query_tokens.expand(6, -1, -1),
            encoder_hidden_states=direct,
            encoder_attention_mask=torch.ones(direct.shape[:2], dtype=torch.long),
        ).last_hidden_state[:, :4]
        assert torch.allclose(bb.project(features, ""), hf.language_projection(queries), atol=1e-5)
        # jobs: the Q-Former reads the fixed instruction recorded in the spec, as the original reads text
        assert bb.spec["qformer_text"] == JOB_INSTRUCTION == bb.instruction
        text = bb.qformer_tokenizer([JOB_INSTRUCTION] * 6, return_tensors="pt")
        with_text = hf.qformer(
            text.input_ids,
            attention_mask=torch.cat([torch.ones(6, 4, dtype=torch.long), text.attention_mask], 1),
            query_embeds=hf.query_tokens.expand(6, -1, -1),
            encoder_hidden_states=direct,
            encoder_attention_mask=torch.ones(direct.shape[:2], dtype=torch.long),
        ).last_hidden_state[:, :4]
        assert torch.allclose(bb.project(features), hf.language_projection(with_text), atol=1e-5)
        assert not torch.allclose(with_text, queries, atol=1e-3)
        embeds = torch.randn(2, 9, 64)
        ours = bb.lm_head(model.lm(inputs_embeds=embeds).last_hidden_state)
        assert torch.allclose(ours, hf.language_model(inputs_embeds=embeds).logits, atol=1e-5)
    assert torch.equal(model.fusion.up.weight, mods["fusion"].up.weight)  # ST-LLM's global MLP
    assert torch.equal(model.mvm_head.proj.weight, mods["mvm"].proj.weight)  # and its MVM head
    assert model.prompt_mid == "</s>###Human: " and model.prompt_tail == " ###Assistant: "


def test_a_single_file_checkpoint_loads_every_key(release, tmp_path):
    """The original loader only read sharded files and silently loaded nothing from a single one."""
    src, mods = release
    single = tmp_path / "single"
    single.mkdir()
    torch.save(load_checkpoint(src), single / "pytorch_model.bin")
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        if (src / name).exists():
            (single / name).write_bytes((src / name).read_bytes())
    out = convert_stllm(single, tmp_path / "out", mods["qformer_tokenizer"])
    a, b = load_model(out, device="cpu", dtype="fp32"), mods["hf"]
    assert torch.equal(a.backbone.projector.weight, b.language_projection.weight)
    # and the same weights as safetensors (shared tensors saved once)
    from safetensors.torch import save_file

    (single / "pytorch_model.bin").unlink()
    state = load_checkpoint(src)
    state.pop("model.stllm_model.embed_tokens.weight")
    save_file({k: v.contiguous() for k, v in state.items()}, single / "model.safetensors")
    c = load_model(
        convert_stllm(single, tmp_path / "out2", mods["qformer_tokenizer"]), device="cpu", dtype="fp32"
    )
    assert torch.equal(
        c.backbone.adapter.temporal[0].temporal_fc.weight, mods["adapter"].temporal[0].temporal_fc.weight
    )


def _rewrite(src, dst, edit) -> None:
    dst.mkdir()
    state = load_checkpoint(src)
    edit(state)
    torch.save(state, dst / "pytorch_model.bin")
    for f in src.iterdir():
        if f.suffix in (".json", ".model") and "index" not in f.name:
            (dst / f.name).write_bytes(f.read_bytes())


def test_missing_and_unexpected_keys_are_refused_by_name(release, tmp_path):
    src, mods = release
    lost = "model.stllm_model.Qformer.bert.encoder.layer.1.output.dense.weight"
    _rewrite(src, tmp_path / "missing", lambda s: s.pop(lost))
    with pytest.raises(
        ConversionError, match=r"missing: \['qformer\.encoder\.layer\.1\.output\.dense\.weight'\]"
    ):
        convert_stllm(tmp_path / "missing", tmp_path / "o1", mods["qformer_tokenizer"])
    _rewrite(
        src, tmp_path / "extra", lambda s: s.__setitem__("model.stllm_model.surprise.weight", torch.zeros(1))
    )
    with pytest.raises(ConversionError, match="model.stllm_model.surprise.weight"):
        convert_stllm(tmp_path / "extra", tmp_path / "o2", mods["qformer_tokenizer"])
    adapter_key = "model.stllm_model.visual_encoder.BTAdapter_T.1.temporal_fc.weight"
    _rewrite(src, tmp_path / "noadapter", lambda s: s.pop(adapter_key))
    with pytest.raises(ConversionError, match=r"temporal\.1\.temporal_fc\.weight"):
        convert_stllm(tmp_path / "noadapter", tmp_path / "o3", mods["qformer_tokenizer"])
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()


class Oracle:
    """A stand-in model that answers every question right (or, with ``wrong``, always with another option):
    it reads the correct letter from the prompt it is given, to check the harness's bookkeeping."""

    version = "oracle"

    def __init__(self, answers: dict[str, str], wrong: bool):
        self.answers, self.wrong = answers, wrong
        self.backbone = type("B", (), {"image_size": 32})()

    def frame_features(self, frames):
        return torch.zeros(frames.shape[0], 1, 1)

    def video_tokens(self, features, text=None):
        return features.flatten(1, 2)

    def _pick(self, prompt: str, n: int) -> int:
        right = string.ascii_uppercase.index(self.answers[prompt])
        return (right + 1) % n if self.wrong else right

    def generate(self, video, prompt, max_new_tokens, answer_prefix):
        n = prompt.count("\n(")
        return [string.ascii_uppercase[self._pick(prompt, n)] + ") something"]

    def score(self, video, prompts, letters, answer_prefix, in_context=False):
        logp = torch.full((1, 1, len(letters)), -5.0)
        logp[0, 0, self._pick(prompts[0], len(letters))] = -0.1
        return logp


def test_mc_harness_scores_a_right_and_a_wrong_model(tmp_path):
    from workers.tools.linevideo import generate_dataset

    records = generate_dataset(tmp_path / "v", 4, seed=11, duration=12.0)
    rows = line_video_questions(records)
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(b"not a video")
    rows.append({**rows[0], "video": str(bad)})
    path = tmp_path / "mc.json"
    path.write_text(json.dumps(rows))
    questions = load_questions(path)
    assert {q.task for q in questions} == {"event order", "counting"}
    answers = {q.prompt(): string.ascii_uppercase[q.answer_index()] for q in questions}
    right = evaluate_mc(Oracle(answers, wrong=False), questions)
    wrong = evaluate_mc(Oracle(answers, wrong=True), questions)
    assert right["errors"] == wrong["errors"] == 1  # the corrupt video fails alone
    assert right["failed"] == [
        {"video": str(bad), "task": rows[0]["task"], "error": right["failed"][0]["error"]}
    ]
    n = len(questions)
    for mode in ("generate", "score"):
        # the failed item counts as wrong in the headline, as the paper's run would have had it
        assert right[mode]["overall"] == (n - 1) / n and right[mode]["readable"] == 1.0
        assert wrong[mode]["overall"] == 0.0 and set(wrong[mode]["per_task"].values()) == {0.0}


def test_mc_answers_in_any_form_and_bad_ones_refused(tmp_path):
    from workers.tools.mc import MCQuestion

    base = {"video": "v.mp4", "question": "q?", "options": ["red", "green", "blue"]}
    assert [MCQuestion(**base, answer=a).answer_index() for a in ("green", "B", "(B)", 1)] == [1, 1, 1, 1]
    for a in ("purple", "(D)", 3):
        with pytest.raises(ValueError):
            MCQuestion(**base, answer=a).answer_index()


def test_eval_mc_command_runs_the_converted_model(converted, tmp_path):
    from workers.tools.linevideo import generate_dataset

    records = generate_dataset(tmp_path / "v", 2, seed=12, duration=8.0)
    (tmp_path / "mc.json").write_text(json.dumps(line_video_questions(records)))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "workers.cli",
            "eval",
            "mc",
            str(tmp_path / "mc.json"),
            "--model",
            str(converted),
        ]
        + ["--dtype", "fp32", "--out", str(tmp_path / "result.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["model_version"] == "st-llm" and result["errors"] == 0
    for mode in ("generate", "score"):
        assert 0.0 <= result[mode]["overall"] <= 1.0 and "overall" in out.stdout
    letters = set(string.ascii_uppercase[:4])
    assert all(i["score"] in letters for i in result["items"])  # scoring always names an option


def test_converted_model_trains_under_the_stllm_method(converted, tmp_path):
    """All tokens, global-local and masking + MVM on the converted model; it can also be a store's base."""
    from workers.rounds.registry import ModelStore
    from workers.rounds.run import init_store
    from workers.stllm.model import IGNORE

    model = load_model(converted, device="cpu", dtype="fp32")
    model.attach_lora()
    model.train()
    features = model.backbone.vision_features(torch.randn(8, 3, 28, 28)).detach()
    local = features[:4].unsqueeze(0).expand(2, -1, -1, -1)
    video = model.video_tokens(local, features.unsqueeze(0).expand(2, -1, -1, -1))
    assert video.shape == (2, 4 * 4, 64)  # every token of every frame: 4 frames x 4 queries
    prompt, answer = model.question_ids("Is the line jammed?"), model.text_ids("yes")
    ids = torch.tensor([prompt + answer] * 2)
    labels = torch.tensor([[IGNORE] * len(prompt) + answer] * 2)
    out = model.training_loss(video, ids, labels, torch.ones_like(ids), masking=True, mvm=True)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["mvm"] > 0 and 0.1 <= float(out["rho"]) <= 0.7
    assert model.backbone.projector.weight.grad is not None and model.mvm_head.proj.weight.grad is not None
    store = ModelStore(tmp_path / "store")
    init_store(store, str(converted))
    assert load_model(store.serving()[1], device="cpu", dtype="fp32").backbone.adapter is not None


def test_the_temporal_adapter_sees_one_clip_at_a_time(converted):
    """Each window's frames are one clip, the global frames others of at most 16: a window's features never
    depend on its neighbours' frames, and the adapter never sees more frames than the QA model trained on."""
    model = load_model(converted, device="cpu", dtype="fp32")
    bb = model.backbone
    assert bb.clip_frames == 16
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 255, (20, 28, 28, 3), dtype=torch.uint8, generator=gen)
    windows = torch.tensor([[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7]])
    every = torch.arange(20)
    f = model.window_features(frames, windows, every)
    assert f.windows.shape[:2] == (3, 4) and f.global_frames.shape[0] == 20
    from workers.stllm.video import preprocess_frames

    def alone(idx):
        pixels = preprocess_frames(frames[idx], bb.image_size, bb.image_mean, bb.image_std)
        with torch.no_grad():
            return bb.vision_features(pixels, clip=len(idx))

    assert torch.allclose(f.windows[1], alone(windows[1]), atol=1e-5)
    changed = frames.clone()
    changed[[0, 1, 6, 7]] = 255 - changed[[0, 1, 6, 7]]  # the frames only the neighbours hold
    g = model.window_features(changed, windows, every)
    assert torch.allclose(g.windows[1], f.windows[1], atol=1e-6)
    assert not torch.allclose(g.windows[0], f.windows[0], atol=1e-3)  # the neighbours did change
    # the global frames: clips of 16, then the remaining 4, each on its own
    assert torch.allclose(f.global_frames[:16], alone(every[:16]), atol=1e-5)
    assert torch.allclose(f.global_frames[16:], alone(every[16:]), atol=1e-5)
    # and the windows' frames are not features of the global clip (the old chunk of 64 mixed them)
    assert not torch.allclose(f.windows[0], f.global_frames[:4], atol=1e-3)


def test_frozen_parts_stay_in_eval_mode_while_training(converted):
    """model.train() leaves the vision tower, the temporal adapter and the Q-Former (dropout 0.1) in eval mode,
    as the original pins them; the LM with its LoRA trains."""
    from workers.stllm.model import IGNORE

    model = load_model(converted, device="cpu", dtype="fp32")
    model.attach_lora()
    model.train()
    bb = model.backbone
    seen: dict[str, bool] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, _a, name=name: seen.__setitem__(name, mod.training))
        for part in bb.frozen_modules()
        for name, m in part.named_modules()
    ]
    assert {type(p).__name__ for p in bb.frozen_modules()} >= {"TemporalAdapter"}
    features = model.vision_features(torch.randn(4, 3, 28, 28), clip=4)
    video = model.video_tokens(features[None], features[None])
    prompt, answer = model.question_ids("Is it?"), model.text_ids("yes")
    ids = torch.tensor([prompt + answer])
    labels = torch.tensor([[IGNORE] * len(prompt) + answer])
    model.training_loss(video, ids, labels, torch.ones_like(ids))["loss"].backward()
    for h in hooks:
        h.remove()
    assert seen and not any(seen.values()), [n for n, t in seen.items() if t]
    assert model.lm.training and bb.projector.training


def test_the_global_part_is_the_mean_of_projected_tokens(converted, tiny_model):
    """A converted release, as the original: the Q-Former + projection runs on every global frame, then the
    mean; for a Q-Former that differs from projecting the mean feature. A fresh model projects the mean."""
    feats = torch.randn(6, 4, 32)
    with torch.no_grad():
        fresh = tiny_model.video_tokens(feats[:2][None], feats[None])
        g = tiny_model.backbone.project(feats.mean(0, keepdim=True))
        local = tiny_model.backbone.project(feats[:2])[None]
        assert tiny_model.config.global_mean == "features"
        assert torch.allclose(fresh, tiny_model.fusion(local, g).flatten(1, 2), atol=1e-5)
    model = load_model(converted, device="cpu", dtype="fp32")
    assert model.config.global_mean == "tokens"
    bb = model.backbone
    feats = bb.vision_features(torch.randn(6, 3, 28, 28)).detach()
    with torch.no_grad():
        video = model.video_tokens(feats[:2][None], feats[None])
        local = bb.project(feats[:2])[None]
        mean_of_projected = bb.project(feats).mean(0, keepdim=True)
        assert torch.allclose(video, model.fusion(local, mean_of_projected).flatten(1, 2), atol=1e-5)
        projected_mean = bb.project(feats.mean(0, keepdim=True))
        assert not torch.allclose(video, model.fusion(local, projected_mean).flatten(1, 2), atol=1e-4)


def test_rotary_buffers_of_an_old_release_are_dropped_and_checked(release, tmp_path):
    """A release saved with transformers 4.28 carries model.layers.*.self_attn.rotary_emb.inv_freq: set aside
    (they are no parameter today) after checking them against rope_theta, not refused."""
    src, mods = release
    head_dim = 64 // 4
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)

    def add(state, value=inv_freq):
        for i in range(2):
            state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = value.clone()

    _rewrite(src, tmp_path / "old", add)
    out = convert_stllm(tmp_path / "old", tmp_path / "o1", mods["qformer_tokenizer"])
    assert torch.equal(
        load_model(out, device="cpu", dtype="fp32").backbone.projector.weight,
        mods["hf"].language_projection.weight,
    )
    _rewrite(src, tmp_path / "odd", lambda s: add(s, inv_freq * 2))
    with pytest.raises(ConversionError, match="rotary inv_freq buffers differ"):
        convert_stllm(tmp_path / "odd", tmp_path / "o2", mods["qformer_tokenizer"])


def test_the_tokenizer_splits_text_as_the_original_slow_legacy_tokenizer(release, converted):
    """The release's config.json says model_type st_llm_hf; the Llama tokenizer is read by class, legacy: every
    piece of text after a special token is encoded by SentencePiece on its own, with its dummy prefix, as the
    original's slow LlamaTokenizer did (``</s>###`` -> ``</s>``, ``▁###``; a non-legacy tokenizer gives ``###``)."""
    import sentencepiece as spm

    _, mods = release
    sp = spm.SentencePieceProcessor(model_file=mods["sentencepiece"])

    def original(text: str) -> list[int]:
        ids: list[int] = []
        for i, piece in enumerate(text.split("</s>")):
            ids += ([sp.eos_id()] if i else []) + (sp.encode(piece) if piece else [])
        return ids

    model = load_model(converted, device="cpu", dtype="fp32")
    for text in (
        "</s>###Human: ",
        "</s>###Human: Is the line jammed? ###Assistant: yes",
        "Carefully watch the video.###Human: <Video></s>###Human: Question: Which event happens first?",
    ):
        assert model.text_ids(text) == original(text), text
    assert sp.id_to_piece(model.text_ids("</s>###Human: ")[1]).startswith("▁")  # the dummy prefix after </s>


def _original_release_state(
    vit=176,
    vit_layers=4,
    vit_mlp=352,
    patches=4,
    q=128,
    q_layers=2,
    q_mlp=256,
    q_vocab=None,
    queries=4,
    d=64,
    layers=2,
    mlp=128,
    vocab=341,
    adapter_mlp=768,
):
    """A release's tensors under the names the original's code defines (st_llm.py's STLLMModel, eva_vit's
    blocks, eva_btadapter's BTAdapter_S/T, LAVIS's Q-Former BertModel with cross-attention every 2nd layer,
    transformers 4.28's LlamaForCausalLM with its rotary buffers), written from those definitions rather than
    from this project's converter."""
    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    s = {}
    e = "model.stllm_model.visual_encoder."
    s |= {e + "cls_token": r(1, 1, vit), e + "pos_embed": r(1, 1 + patches, vit)}
    s |= {e + "patch_embed.proj.weight": r(vit, 3, 14, 14), e + "patch_embed.proj.bias": r(vit)}

    def eva_block(p, hidden):
        return {
            p + "norm1.weight": 1 + r(vit),
            p + "norm1.bias": r(vit),
            p + "attn.qkv.weight": r(3 * vit, vit),
            p + "attn.q_bias": r(vit),
            p + "attn.v_bias": r(vit),
            p + "attn.proj.weight": r(vit, vit),
            p + "attn.proj.bias": r(vit),
            p + "norm2.weight": 1 + r(vit),
            p + "norm2.bias": r(vit),
            p + "mlp.fc1.weight": r(hidden, vit),
            p + "mlp.fc1.bias": r(hidden),
            p + "mlp.fc2.weight": r(vit, hidden),
            p + "mlp.fc2.bias": r(vit),
        }

    for i in range(vit_layers):
        s |= eva_block(f"{e}blocks.{i}.", vit_mlp)
    s |= {e + "BTAdapter_cls": r(1, 1, vit), e + "BTAdapter_position.weight": r(64, vit)}
    for i in range(3):
        s |= eva_block(f"{e}BTAdapter_S.{i}.", adapter_mlp)
        t = f"{e}BTAdapter_T.{i}."
        s |= {
            t + "norm1.weight": 1 + r(vit),
            t + "norm1.bias": r(vit),
            t + "attn.qkv.weight": r(3 * vit, vit),
            t + "attn.q_bias": r(vit),
            t + "attn.v_bias": r(vit),
            t + "attn.proj.weight": r(vit, vit),
            t + "attn.proj.bias": r(vit),
            t + "temporal_fc.weight": r(vit, vit),
            t + "temporal_fc.bias": r(vit),
        }
    m = "model.stllm_model."
    s |= {m + "ln_vision.weight": 1 + r(vit), m + "ln_vision.bias": r(vit)}
    b = m + "Qformer.bert."
    s |= {
        b + "embeddings.word_embeddings.weight": r(q_vocab, q),
        b + "embeddings.position_embeddings.weight": r(512, q),
        b + "embeddings.position_ids": torch.arange(512)[None],
        b + "embeddings.LayerNorm.weight": 1 + r(q),
        b + "embeddings.LayerNorm.bias": r(q),
    }

    def bert_attention(p, kv):
        return {
            p + "self.query.weight": r(q, q),
            p + "self.query.bias": r(q),
            p + "self.key.weight": r(q, kv),
            p + "self.key.bias": r(q),
            p + "self.value.weight": r(q, kv),
            p + "self.value.bias": r(q),
            p + "output.dense.weight": r(q, q),
            p + "output.dense.bias": r(q),
            p + "output.LayerNorm.weight": 1 + r(q),
            p + "output.LayerNorm.bias": r(q),
        }

    for i in range(q_layers):
        p = f"{b}encoder.layer.{i}."
        s |= bert_attention(p + "attention.", q)
        if i % 2 == 0:
            s |= bert_attention(p + "crossattention.", vit)
        for kind in ("", "_query"):
            s |= {
                f"{p}intermediate{kind}.dense.weight": r(q_mlp, q),
                f"{p}intermediate{kind}.dense.bias": r(q_mlp),
                f"{p}output{kind}.dense.weight": r(q, q_mlp),
                f"{p}output{kind}.dense.bias": r(q),
                f"{p}output{kind}.LayerNorm.weight": 1 + r(q),
                f"{p}output{kind}.LayerNorm.bias": r(q),
            }
    s |= {m + "query_tokens": r(1, queries, q), m + "llama_proj.weight": r(d, q), m + "llama_proj.bias": r(d)}
    s |= {m + "mvm_decoder.head.weight": r(d, d), m + "mvm_decoder.head.bias": r(d)}
    s |= {m + "mvm_decoder.norm.weight": 1 + r(d), m + "mvm_decoder.norm.bias": r(d)}
    s |= {m + "down_proj.weight": r(32, d), m + "down_proj.bias": r(32)}
    s |= {m + "up_proj.weight": r(d, 32), m + "up_proj.bias": r(d)}
    s["model.embed_tokens.weight"] = r(vocab, d)
    s[m + "embed_tokens.weight"] = s["model.embed_tokens.weight"]  # STLLMModel.embed_tokens is the LLM's
    head_dim = d // 4
    for i in range(layers):
        p = f"model.layers.{i}."
        s |= {p + f"self_attn.{n}_proj.weight": r(d, d) for n in "qkvo"}
        s |= {p + "mlp.gate_proj.weight": r(mlp, d), p + "mlp.up_proj.weight": r(mlp, d)}
        s |= {p + "mlp.down_proj.weight": r(d, mlp)}
        s |= {p + "input_layernorm.weight": 1 + r(d), p + "post_attention_layernorm.weight": 1 + r(d)}
        s[p + "self_attn.rotary_emb.inv_freq"] = 1.0 / 10000 ** (
            torch.arange(0, head_dim, 2).float() / head_dim
        )
    s |= {"model.norm.weight": 1 + r(d), "lm_head.weight": r(vocab, d)}
    return s


def test_a_release_under_the_original_key_names_lands_where_the_original_uses_it(release, tmp_path):
    """Written from the original code's names (not from the converter's inverse): every tensor lands in the
    module that plays its part in the original."""
    from workers.stllm.testing import llama_tokenizer

    src, mods = release
    qtok_vocab = len(__import__("transformers").AutoTokenizer.from_pretrained(mods["qformer_tokenizer"]))
    state = _original_release_state(q_vocab=qtok_vocab)
    rel = tmp_path / "original"
    llama_tokenizer(rel)
    torch.save(state, rel / "pytorch_model.bin")
    config = {
        "model_type": "st_llm_hf",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 2048,
    }
    (rel / "config.json").write_text(json.dumps(config))
    model = load_model(
        convert_stllm(rel, tmp_path / "out", mods["qformer_tokenizer"]), device="cpu", dtype="fp32"
    )
    bb = model.backbone
    vit, qf = bb.vision.state_dict(), bb.qformer.state_dict()
    e, m = "model.stllm_model.visual_encoder.", "model.stllm_model."
    d = 176
    qkv_bias = vit["encoder.layers.2.self_attn.qkv.bias"]
    assert torch.equal(qkv_bias[:d], state[e + "blocks.2.attn.q_bias"]) and not qkv_bias[d : 2 * d].any()
    assert torch.equal(qkv_bias[2 * d :], state[e + "blocks.2.attn.v_bias"])
    assert torch.equal(
        vit["encoder.layers.3.self_attn.projection.weight"], state[e + "blocks.3.attn.proj.weight"]
    )
    assert torch.equal(vit["embeddings.class_embedding"], state[e + "cls_token"])
    assert torch.equal(vit["post_layernorm.weight"], state[m + "ln_vision.weight"])
    b = m + "Qformer.bert."
    assert torch.equal(
        qf["encoder.layer.0.crossattention.attention.key.weight"],
        state[b + "encoder.layer.0.crossattention.self.key.weight"],
    )
    assert not any(k.startswith("encoder.layer.1.crossattention") for k in qf)  # every 2nd layer only
    assert torch.equal(
        qf["encoder.layer.1.output_query.LayerNorm.bias"],
        state[b + "encoder.layer.1.output_query.LayerNorm.bias"],
    )
    assert torch.equal(qf["embeddings.layernorm.weight"], state[b + "embeddings.LayerNorm.weight"])
    assert torch.equal(bb.query_tokens, state[m + "query_tokens"])
    assert torch.equal(bb.projector.weight, state[m + "llama_proj.weight"])
    a = bb.adapter.state_dict()
    assert torch.equal(a["temporal.1.temporal_fc.weight"], state[e + "BTAdapter_T.1.temporal_fc.weight"])
    assert torch.equal(a["spatial.0.attn.v_bias"], state[e + "BTAdapter_S.0.attn.v_bias"])
    assert torch.equal(a["spatial.2.mlp.fc1.weight"], state[e + "BTAdapter_S.2.mlp.fc1.weight"])
    assert torch.equal(a["position.weight"], state[e + "BTAdapter_position.weight"])
    assert torch.equal(model.fusion.up.weight, state[m + "up_proj.weight"])
    assert torch.equal(model.fusion.down.bias, state[m + "down_proj.bias"])
    assert torch.equal(model.mvm_head.proj.weight, state[m + "mvm_decoder.head.weight"])
    assert torch.equal(model.mvm_head.norm.bias, state[m + "mvm_decoder.norm.bias"])
    dec = bb.decoder.state_dict()
    assert torch.equal(
        dec["layers.1.self_attn.o_proj.weight"], state["model.layers.1.self_attn.o_proj.weight"]
    )
    assert torch.equal(dec["layers.0.mlp.gate_proj.weight"], state["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(bb.lm_head.weight, state["lm_head.weight"])


def test_mc_prompt_is_the_originals_to_the_character(release, converted):
    """get_prompt2 of the original's MVBench conversation (system in front and in the question, ``###``
    separators, ``\n###Assistant:``), split at the video and tokenized per segment, bos ``</s>`` first."""
    import sentencepiece as spm

    from workers.tools.mc import ANSWER_PREFIX, QUESTION_PROMPT, SYSTEM, MCQuestion, original_prompt

    _, mods = release
    sp = spm.SentencePieceProcessor(model_file=mods["sentencepiece"])
    q = MCQuestion(
        video="v.mp4", question="Which event happens first?", options=["jam", "hand"], answer="jam"
    )
    assert q.qa_text() == "Question: Which event happens first?\nOptions:\n(A) jam\n(B) hand"
    # the original: system + sep, then each message "role: message" + sep, the last without sep
    messages = [
        ("Human", "<Video><VideoHere></Video>\n"),
        ("Human", SYSTEM + q.qa_text() + QUESTION_PROMPT + "\n"),
    ]
    text = SYSTEM + "###" + "".join(f"{r}: {m}###" for r, m in messages) + "Assistant: " + ANSWER_PREFIX
    before, after = text.split("<VideoHere>")
    assert after.endswith("\nOnly give the best option.\n###Assistant: Best option:(")
    model = load_model(converted, device="cpu", dtype="fp32")
    with original_prompt(model):
        assert model.text_ids(model.prompt_head) == [sp.eos_id()] + sp.encode(before)  # its bos is </s>
        assert model.question_ids(q.prompt(), ANSWER_PREFIX) == sp.encode(after)
    assert model.prompt_tail == " ###Assistant: "  # jobs keep the training format


def test_mc_frames_follow_the_originals_get_index():
    """One frame per second of the clip, floored (not rounded), clamped to 4-16, segment midpoints."""
    from workers.tools.mc import frame_indices

    assert len(frame_indices(None, None, fps=10, max_frame=24)) == 4  # 2.4 s
    assert len(frame_indices(None, None, fps=10, max_frame=97)) == 9  # 9.7 s: floor, round would give 10
    assert len(frame_indices(None, None, fps=10, max_frame=400)) == 16
    # 100 frames at 10 fps: 9.9 s -> 9 segments of 11 frames, int(5.5 + round(11 i))
    assert frame_indices(None, None, fps=10, max_frame=99) == [5 + 11 * i for i in range(9)]
    # a bound of 2.0-8.0 s at 30 fps: frames 60-240, 6 segments of 30
    assert frame_indices(2.0, 8.0, fps=30, max_frame=900) == [75 + 30 * i for i in range(6)]
    # a frame folder at 3 fps, numbered from 1: frames 3-12, 4 segments of 2.25; np.round(4.5) is 4 (to even)
    assert frame_indices(1.0, 4.0, fps=3, max_frame=40, first=1) == [4, 6, 8, 11]


def test_mc_letters_are_scored_as_they_follow_the_parenthesis(converted):
    """With a SentencePiece tokenizer "A" alone is "▁", "A"; after "(" it is "A": scoring reads that token."""
    from workers.stllm.video import preprocess_frames
    from workers.tools.mc import ANSWER_PREFIX, MCQuestion, original_prompt

    model = load_model(converted, device="cpu", dtype="fp32")
    q = MCQuestion(video="v.mp4", question="Which first?", options=["jam", "hand"], answer="jam")
    with original_prompt(model):
        alone, in_context = model.text_ids("A"), model._continuation(q.prompt(), ANSWER_PREFIX, "A")
        assert len(in_context) == 1 and alone != in_context
        bb = model.backbone
        frames = torch.randint(0, 255, (4, 28, 28, 3), dtype=torch.uint8)
        pixels = preprocess_frames(frames, bb.image_size, bb.image_mean, bb.image_std)
        video = model.video_tokens(model.vision_features(pixels, clip=4)[None], text=q.qa_text())
        got = model.score(video, [q.prompt()], ["A", "B"], answer_prefix=ANSWER_PREFIX, in_context=True)[0, 0]
        ids = model.text_ids(model.prompt_head)
        context = model.question_ids(q.prompt(), ANSWER_PREFIX)
        x = torch.cat([model.embed(torch.tensor([ids])), video, model.embed(torch.tensor([context]))], 1)
        with torch.no_grad():
            last = model.backbone.lm_head(model.lm(inputs_embeds=x).last_hidden_state[0, -1]).log_softmax(-1)
        letters = [model._continuation(q.prompt(), ANSWER_PREFIX, c)[0] for c in "AB"]
        assert torch.allclose(got, last[letters], atol=1e-4)


def test_eval_mc_reads_a_downloaded_mvbench(converted, tmp_path):
    """MVBench's own layout: json/ with per-task files (candidates, answer as text, start/end for bounded
    tasks), videos under video/<task folder>, the frame-folder task as 00001.jpg... at 3 fps; a missing video
    is listed and counted wrong."""
    import numpy as np
    from PIL import Image

    from workers.tools.linevideo import generate_dataset

    root = tmp_path / "MVBench"
    count_dir = root / "video" / "perception" / "videos"
    records = generate_dataset(count_dir, 2, seed=5, duration=6.0)
    (root / "json").mkdir(parents=True)
    rows = [
        {
            "video": Path(r["video"]).name,
            "question": "How many parts?",
            "candidates": ["1", "2", "3"],
            "answer": "2",
        }
        for r in records
    ]
    rows.append({"video": "missing.mp4", "question": "How many?", "candidates": ["1", "2"], "answer": "1"})
    (root / "json" / "action_count.json").write_text(json.dumps(rows))
    frames = root / "video" / "tvqa" / "frames_fps3_hq" / "clip_1"
    frames.mkdir(parents=True)
    for i in range(1, 31):
        Image.fromarray(np.full((40, 56, 3), 8 * i, dtype=np.uint8)).save(frames / f"{i:05d}.jpg")
    episodic = [
        {
            "video": "clip_1",
            "question": "Who?",
            "candidates": ["a", "b"],
            "answer": "b",
            "start": 1.0,
            "end": 8.0,
        }
    ]
    (root / "json" / "episodic_reasoning.json").write_text(json.dumps(episodic))
    questions = load_questions(root / "json")
    assert {q.task for q in questions} == {"Action Count", "Episodic Reasoning"} and len(questions) == 4
    result = evaluate_mc(load_model(converted, device="cpu", dtype="fp32"), questions, ("score",))
    assert result["n"] == 4 and result["errors"] == 1
    assert result["failed"][0]["video"].endswith("missing.mp4")
    assert all(i.get("score") in ("A", "B", "C") for i in result["items"] if "error" not in i)
    right = sum(i.get("score") == i["answer"] for i in result["items"])
    assert result["score"]["overall"] == right / 4


def test_the_qformer_reads_the_mc_question_with_its_options(converted, tmp_path):
    """eval mc hands the Q-Former ``Question: ...\\nOptions:\\n(A) ...``; up to 256 tokens are read (cut from the
    left), so text before the last 32 tokens still counts."""
    from workers.tools.linevideo import generate_dataset
    from workers.tools.mc import MCQuestion

    model = load_model(converted, device="cpu", dtype="fp32")
    bb = model.backbone
    feats = bb.vision_features(torch.randn(2, 3, 28, 28)).detach()
    tail = " what happens first in the video" * 8  # > 32 tokens
    with torch.no_grad():
        a, b = bb.project(feats, "the" + tail), bb.project(feats, "how" + tail)
    assert not torch.allclose(a, b, atol=1e-5)
    records = generate_dataset(tmp_path / "v", 1, seed=4, duration=5.0)
    q = MCQuestion(video=records[0]["video"], question="How many?", options=["1", "2"], answer="1")
    seen = []
    tokens = model.video_tokens
    model.video_tokens = lambda *args, text=None: seen.append(text) or tokens(*args, text=text)
    evaluate_mc(model, [q], ("score",))
    assert seen == [q.qa_text()] and seen[0].startswith("Question: How many?\nOptions:\n(A) 1\n(B) 2")
