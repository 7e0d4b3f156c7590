"""ST-LLM as published: converting a release checkpoint (written here at toy size with the original key names)
strictly, the converted model against a direct forward of the same weights, and the multiple-choice harness."""

from __future__ import annotations

import json
import string
import subprocess
import sys

import pytest
import torch

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
        assert torch.allclose(bb.project(features), hf.language_projection(queries), atol=1e-5)
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
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
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
        if f.suffix == ".json" and "index" not in f.name:
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

    def video_tokens(self, features):
        return features.flatten(1, 2)

    def _pick(self, prompt: str, n: int) -> int:
        right = string.ascii_uppercase.index(self.answers[prompt])
        return (right + 1) % n if self.wrong else right

    def generate(self, video, prompt, max_new_tokens, answer_prefix):
        n = prompt.count("\n(")
        return [string.ascii_uppercase[self._pick(prompt, n)] + ") something"]

    def score(self, video, prompts, letters, answer_prefix):
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
    for mode in ("generate", "score"):
        assert right[mode]["overall"] == 1.0 and set(right[mode]["per_task"].values()) == {1.0}
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
