"""The ST-LLM engine: method pieces, cached scoring, training, save/load."""

from __future__ import annotations

import torch

from workers.stllm.cpu import CpuServing
from workers.stllm.io import build_model, load_model, save_model
from workers.stllm.model import (
    IGNORE,
    GlobalLocalFusion,
    STLLMConfig,
    gather_tokens,
    keep_positions,
    mvm_loss,
    sample_mask_ratio,
)
from workers.stllm.testing import score_naive


def test_mask_ratio_stays_in_bounds_and_centres_on_half():
    cfg = STLLMConfig()
    g = torch.Generator().manual_seed(0)
    rhos = torch.tensor([sample_mask_ratio(cfg, g) for _ in range(2000)])
    assert rhos.min() >= 0.1 and rhos.max() <= 0.7
    assert abs(rhos.mean().item() - 0.5) < 0.02
    assert rhos.std().item() > 0.05  # really random, not a constant


def test_masked_tokens_keep_frame_order_and_count():
    g = torch.Generator().manual_seed(1)
    keep = keep_positions(batch=4, length=64, rho=0.3, generator=g)
    assert keep.shape == (4, 64 - int(0.3 * 64))
    assert torch.all(keep[:, 1:] > keep[:, :-1])  # strictly increasing: order kept, no repeats
    assert not torch.equal(keep[0], keep[1])  # each sample draws its own positions
    tokens = torch.arange(64).float().view(1, 64, 1).expand(4, 64, 3)
    kept = gather_tokens(tokens, keep)
    assert torch.equal(kept[..., 0].long(), keep)


def test_global_local_equals_plain_local_input_at_initialisation():
    fusion = GlobalLocalFusion(dim=16, bottleneck=8)
    local = torch.randn(2, 4, 3, 16)
    global_mean = torch.randn(2, 3, 16) * 10
    assert torch.equal(fusion(local, global_mean), local)
    fusion.up.weight.data.normal_()
    assert not torch.allclose(fusion(local, global_mean), local)


def test_mvm_loss_is_zero_for_equal_and_grows_with_perturbation():
    t = torch.randn(2, 10, 32)
    assert mvm_loss(t, t).item() < 1e-6
    losses = [mvm_loss(t + s * torch.randn_like(t), t).item() for s in (0.1, 0.5, 2.0)]
    assert losses[0] < losses[1] < losses[2]
    assert abs(mvm_loss(-t, t).item() - 4.0) < 1e-5


def test_global_local_token_count_is_independent_of_video_length(tiny_model):
    f16 = torch.randn(1, 16, 4, 32)
    for total in (16, 64, 256):
        tokens = tiny_model.video_tokens(f16, torch.randn(1, total, 4, 32))
        assert tokens.shape == (1, 16 * 4, tiny_model.backbone.hidden_size)


def test_cached_scoring_equals_naive_scoring(tiny_model):
    torch.manual_seed(3)
    video = tiny_model.video_tokens(torch.randn(2, 3, 4, 32), torch.randn(2, 6, 4, 32))
    queries = ["Is a part passing?", "Is the line jammed right now?"]
    for candidates in (["yes", "no"], ["Apple", "Banana", "C"]):
        # tiny byte tokenizer: "yes" is 3 tokens: the multi-token path
        cached = tiny_model.score(video, queries, candidates)
        naive = score_naive(tiny_model, video, queries, candidates)
        assert cached.shape == (2, 2, len(candidates))
        torch.testing.assert_close(cached, naive, atol=1e-4, rtol=1e-4)


def test_tokens_every_query_starts_with_run_once_per_video(tiny_model, monkeypatch):
    """The video's prefix and 'Does this clip show' run once per video, then every continuation side by
    side in one row per video, not a copy of the prefix per query: in the same forward pass for a short
    prefix, over the prefix's cache for a long one."""
    import workers.stllm.model as model_module

    torch.manual_seed(4)
    video = tiny_model.video_tokens(torch.randn(2, 3, 4, 32))
    queries = ["Does this clip show a jam?", "Does this clip show a hand?"]
    q_ids = [tiny_model.question_ids(q) for q in queries]
    shared = next(i for i, (a, b) in enumerate(zip(*q_ids, strict=False)) if a != b)
    assert shared >= len("Does this clip show a ")
    prefix = len(tiny_model.text_ids(tiny_model.prompt_head)) + video.shape[1] + shared
    assert prefix <= model_module.ONE_PASS_MAX_PREFIX
    widths = []
    hook = tiny_model.lm.register_forward_pre_hook(
        lambda _m, _a, kw: widths.append(kw["inputs_embeds"].shape[:2]), with_kwargs=True
    )
    try:
        for one_pass in (True, False):
            monkeypatch.setattr(model_module, "ONE_PASS_MAX_PREFIX", prefix if one_pass else prefix - 1)
            for candidates in (["y", "n"], ["yes", "no"]):  # single-token and multi-token paths
                widths.clear()
                cached = tiny_model.score(video, queries, candidates)
                passes = list(widths)
                naive = score_naive(tiny_model, video, queries, candidates)
                torch.testing.assert_close(cached, naive, atol=1e-4, rtol=1e-4)
                if candidates[0] == "yes":  # multi-token: one continuation per (query, candidate)
                    c_lens = [len(tiny_model.text_ids(c)) for c in candidates]
                    continuations = sum(len(q) - shared + c for q in q_ids for c in c_lens)
                else:
                    continuations = sum(len(q) - shared for q in q_ids)
                # every continuation once, side by side in one row per video: no copy of the prefix per query
                if one_pass:
                    assert passes == [(video.shape[0], prefix + continuations)]
                else:
                    assert passes == [(video.shape[0], prefix), (video.shape[0], continuations)]
    finally:
        hook.remove()
    # one query: all but its last token join the prefix
    single = tiny_model.score(video, ["Is it?"], ["yes", "no"])
    torch.testing.assert_close(
        single, score_naive(tiny_model, video, ["Is it?"], ["yes", "no"]), atol=1e-4, rtol=1e-4
    )


def test_single_token_candidates_use_the_fast_path_and_match_naive(tiny_model):
    video = tiny_model.video_tokens(torch.randn(3, 2, 4, 32))
    cached = tiny_model.score(video, ["Which?"], ["A", "B", "C"])  # one byte each: the single-token path
    naive = score_naive(tiny_model, video, ["Which?"], ["A", "B", "C"])
    torch.testing.assert_close(cached, naive, atol=1e-4, rtol=1e-4)


def test_generate_returns_one_answer_per_video(tiny_model):
    video = tiny_model.video_tokens(torch.randn(2, 2, 4, 32))
    answers = tiny_model.generate(video, "What happens?", max_new_tokens=5)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def _toy_batch(model, n: int, generator: torch.Generator):
    """A learnable toy task: the answer is 'yes' when the video features are positive, else 'no'."""
    signs = torch.randint(0, 2, (n,), generator=generator)
    feats = torch.randn(n, 4, 4, 32, generator=generator).abs() * (signs * 2 - 1).view(n, 1, 1, 1).float()
    tail = model.prompt_tail
    rows, labels = [], []
    for s in signs.tolist():
        prompt = model.text_ids("Is it bright?" + tail)
        answer = model.text_ids("yes" if s else "no")
        rows.append(prompt + answer)
        labels.append([IGNORE] * len(prompt) + answer)
    width = max(len(r) for r in rows)
    ids = torch.zeros(n, width, dtype=torch.long)
    lab = torch.full((n, width), IGNORE)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, (r, la) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)], lab[i, : len(la)], mask[i, : len(r)] = torch.tensor(r), torch.tensor(la), 1
    return feats, ids, lab, mask


def test_tiny_model_learns_a_toy_visual_question_with_masking_and_mvm(tiny_model):
    model = tiny_model
    model.attach_lora()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        feats, ids, lab, mask = _toy_batch(model, 8, g)
        out = model.training_loss(model.video_tokens(feats, feats), ids, lab, mask, generator=g)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["ce"].item())
        assert 0.1 <= out["rho"].item() <= 0.7 and out["mvm"].item() > 0
    assert sum(losses[-5:]) / 5 < 0.3 * sum(losses[:5]) / 5
    model.eval()
    feats, ids, _, _ = _toy_batch(model, 64, g)
    truth = feats.flatten(1).mean(1) > 0
    scores = model.score(model.video_tokens(feats, feats), ["Is it bright?"], ["yes", "no"])[:, 0]
    assert ((scores[:, 0] > scores[:, 1]) == truth).float().mean() > 0.9


def test_masking_off_gives_no_mvm_term(tiny_model):
    feats, ids, lab, mask = _toy_batch(tiny_model, 2, torch.Generator().manual_seed(0))
    video = tiny_model.video_tokens(feats)
    out = tiny_model.training_loss(video, ids, lab, mask, masking=False)
    assert out["mvm"].item() == 0.0 and out["rho"].item() == 0.0
    out = tiny_model.training_loss(video, ids, lab, mask, masking=True, mvm=False)
    assert out["mvm"].item() == 0.0 and out["rho"].item() > 0


def test_save_load_round_trip_gives_identical_outputs(tiny_model, tmp_path):
    model = tiny_model
    model.attach_lora()
    for p in model.parameters():  # make every trainable part non-trivial, LoRA B included
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    model.eval()
    feats = torch.randn(2, 3, 4, 32)
    before = model.score(model.video_tokens(feats, feats), ["Is it?"], ["yes", "no"])
    save_model(model, tmp_path / "m", version="round-7")
    loaded = load_model(tmp_path / "m", device="cpu")
    assert loaded.version == "round-7"
    assert (tmp_path / "m" / "adapter" / "adapter_config.json").exists()
    after = loaded.score(loaded.video_tokens(feats, feats), ["Is it?"], ["yes", "no"])
    torch.testing.assert_close(before, after, atol=0, rtol=0)


def test_smolvlm2_backbone_encodes_frames_through_its_connector(tmp_path):
    from workers.stllm.testing import tiny_smolvlm

    spec = tiny_smolvlm(tmp_path / "smol")
    model = build_model(spec, device="cpu", dtype="fp32")
    frames = torch.randint(0, 255, (3, 48, 80, 3), dtype=torch.uint8)
    feats = model.frame_features(frames)
    assert feats.shape[:2] == (3, 16)  # 64 px / 16 px patches = 4x4 SigLIP patches
    assert (
        model.backbone.project(feats).shape[:2] == (3, model.backbone.tokens_per_frame) == (3, 4)
    )  # shuffle 2
    video = model.video_tokens(feats.unsqueeze(0), feats.unsqueeze(0))
    torch.testing.assert_close(
        model.score(video, ["Is it?"], ["yes", "no"]),
        score_naive(model, video, ["Is it?"], ["yes", "no"]),
        atol=1e-4,
        rtol=1e-4,
    )


def test_fused_cpu_kernels_match_the_eager_bf16_path_and_keep_parameters(tmp_path, monkeypatch):
    """inference_weights() on a CPU switches linear layers and MLPs to oneDNN's fused kernels; the scores
    match the eager bf16 path to bf16 rounding and the parameters (names, values) do not change."""
    import pytest

    from workers.stllm.cpu.fused import FusedLinear, fusion_available
    from workers.stllm.testing import tiny_smolvlm

    if not fusion_available(torch.zeros(1, dtype=torch.bfloat16)):
        pytest.skip("this torch build has no oneDNN fused linear kernel")
    spec = tiny_smolvlm(tmp_path / "smol")
    frames = torch.randint(0, 255, (6, 48, 80, 3), dtype=torch.uint8)
    questions, candidates = ["Is there a jam?", "Is a hand in view?"], ["yes", "no"]

    def scores(fused: bool):
        model = build_model(spec, device="cpu", dtype="bf16").eval()
        model.inference_weights(CpuServing(fused_linear=fused))
        feats = model.frame_features(frames)
        video = model.video_tokens(
            feats[:4].view(2, 2, *feats.shape[1:]), feats.unsqueeze(0).expand(2, -1, -1, -1)
        )
        return model, model.score(video, questions, candidates)

    eager_model, eager = scores(False)
    fused_model, fused = scores(True)
    assert not any(isinstance(m, FusedLinear) for m in eager_model.modules())
    assert sum(isinstance(m, FusedLinear) for m in fused_model.modules()) > 0
    assert "forward" in vars(fused_model.backbone.vision.encoder.layers[0].mlp)  # GELU inside fc1
    assert "forward" in vars(
        fused_model.backbone.decoder.layers[0].mlp
    )  # SiLU and the gate inside the products
    assert "forward" in vars(
        fused_model.backbone.decoder.layers[0].input_layernorm
    )  # RMSNorm in fewer passes
    torch.testing.assert_close(fused, eager, atol=0.05, rtol=0)
    eager_state, fused_state = eager_model.state_dict(), fused_model.state_dict()
    assert eager_state.keys() == fused_state.keys()
    assert all(torch.equal(eager_state[k], fused_state[k]) for k in eager_state)


def test_tanh_gelu_computed_exactly_in_bf16_stays_as_close_to_the_fp32_model(monkeypatch):
    """A SigLIP MLP (tanh-form GELU) fused for bf16 computes exact GELU inside fc1 (the cheaper post-op):
    its outputs are as close to the fp32 model's (tanh form, eager) as the fused tanh post-op's are."""
    import copy

    import pytest
    from transformers import SiglipVisionConfig
    from transformers.models.siglip.modeling_siglip import SiglipMLP

    from workers.stllm.cpu.fused import fuse_linear_layers, fusion_available, gelu_algorithm

    if not fusion_available(torch.zeros(1, dtype=torch.bfloat16)):
        pytest.skip("this torch build has no oneDNN fused linear kernel")
    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=128, intermediate_size=512, hidden_act="gelu_pytorch_tanh")
    reference = SiglipMLP(config).eval()
    for p in reference.parameters():  # pre-activations of std ~2: both GELU forms' differences show
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(4096, 128)
    with torch.inference_mode():
        expected = reference(x)

    def error(exact_gelu: str) -> float:
        fused = copy.deepcopy(reference).to(torch.bfloat16)
        assert fuse_linear_layers(fused, exact_gelu=exact_gelu == "1") > 0
        with torch.inference_mode():
            out = fused(x.to(torch.bfloat16)).float()
        return ((out - expected).norm() / expected.norm()).item()

    assert gelu_algorithm(True) == "none" and gelu_algorithm(False) == "none"
    exact, tanh = error("1"), error("0")
    assert 0 < exact < 0.01 and 0 < tanh < 0.01
    assert exact <= 1.05 * tanh


def test_rms_norm_rewrite_matches_the_module_and_leaves_its_input_alone():
    """The bf16 RMSNorm rewrite gives the eager module's outputs (up to the fp32 sum's order: one bf16 step
    on a few elements at most), never writes into its input, and leaves fp32 and autograd to the module."""
    import pytest
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from workers.stllm.cpu.fused import fuse_linear_layers, fusion_available

    if not fusion_available(torch.zeros(1, dtype=torch.bfloat16)):
        pytest.skip("this torch build has no oneDNN fused linear kernel")
    torch.manual_seed(0)
    norm = LlamaRMSNorm(576, eps=1e-5)
    torch.nn.init.normal_(norm.weight, 1.0, 0.1)
    norm = norm.to(torch.bfloat16)
    x = torch.randn(8, 111, 576).to(torch.bfloat16) * 3
    with torch.inference_mode():
        eager = norm(x)
        assert fuse_linear_layers(norm) == 1 and "forward" in vars(norm)
        before = x.clone()
        fused = norm(x)
    assert torch.equal(x, before)
    differ = fused != eager
    assert differ.float().mean() < 1e-3
    assert ((fused.float() - eager.float()).abs()[differ] <= eager.float().abs()[differ] / 64).all()
    x32 = torch.randn(4, 576)
    norm.float()
    out = norm(x32.clone().requires_grad_())  # fp32 with autograd: the module's own forward
    out.sum().backward()
    torch.testing.assert_close(out, LlamaRMSNorm.forward(norm, x32))


def test_packed_weights_are_made_once_and_follow_the_weights_they_pack():
    """The fused layers' weights in oneDNN's layout are made on first use, reused, and made again when the
    weight is replaced or changed in place (load_state_dict), so a layer never computes with stale weights."""
    import pytest

    from workers.stllm.cpu.fused import FusedLinear, forget_packed_weights, fusion_available, packed_weight

    if not fusion_available(torch.zeros(1, dtype=torch.bfloat16)):
        pytest.skip("this torch build has no oneDNN fused linear kernel")
    layer = torch.nn.Linear(64, 32).to(torch.bfloat16)
    layer.__class__ = FusedLinear
    x = torch.randn(5, 64, dtype=torch.bfloat16)

    def check(weight: torch.Tensor) -> None:
        with torch.inference_mode():
            out = layer(x)
        torch.testing.assert_close(
            out, torch.nn.functional.linear(x, weight, layer.bias), atol=0.05, rtol=0.02
        )

    check(layer.weight)
    assert packed_weight(layer) is packed_weight(layer)
    doubled = layer.weight.detach() * 2
    layer.load_state_dict({"weight": doubled, "bias": layer.bias.detach()})
    check(doubled)
    layer.weight = torch.nn.Parameter(-doubled, requires_grad=False)
    check(-doubled)
    layer.weight.data.mul_(0.5)  # a write torch does not count: forget_packed_weights() is the way back
    forget_packed_weights()
    check(-doubled * 0.5)


def test_a_served_lora_version_scores_alike_on_the_fused_and_eager_paths(tmp_path, monkeypatch):
    """A fine-tuned version (LoRA adapters on the decoder, not merged) loaded for serving: the fused kernels
    and packed weights reach the adapters' layers too, and the scores match the eager bf16 path."""
    import pytest

    from workers.stllm.cpu.fused import FusedLinear, fusion_available
    from workers.stllm.testing import tiny_smolvlm

    if not fusion_available(torch.zeros(1, dtype=torch.bfloat16)):
        pytest.skip("this torch build has no oneDNN fused linear kernel")
    torch.manual_seed(0)
    model = build_model(tiny_smolvlm(tmp_path / "smol"), device="cpu", dtype="fp32").eval()
    model.attach_lora()
    for p in model.parameters():  # LoRA B starts at zero: make the adapters change the outputs
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    save_model(model, tmp_path / "version", version="round-1")
    frames = torch.randint(0, 255, (4, 48, 80, 3), dtype=torch.uint8)

    def scores(fused: bool):
        served = load_model(tmp_path / "version", device="cpu", dtype="bf16")
        served.inference_weights(CpuServing(fused_linear=fused))
        feats = served.frame_features(frames)
        video = served.video_tokens(
            feats.view(2, 2, *feats.shape[1:]), feats.unsqueeze(0).expand(2, -1, -1, -1)
        )
        return served, served.score(video, ["Is there a jam?", "Is a hand in view?"], ["yes", "no"])

    fused_model, fused = scores(True)
    _, eager = scores(False)
    adapters = [m for n, m in fused_model.named_modules() if n.endswith("lora_A.default")]
    assert adapters and all(isinstance(m, FusedLinear) for m in adapters)
    torch.testing.assert_close(fused, eager, atol=0.05, rtol=0)


def test_fused_linear_falls_back_to_eager_for_autograd_and_fp32():
    from workers.stllm.cpu.fused import FusedLinear

    layer = torch.nn.Linear(8, 4)
    layer.__class__ = FusedLinear  # fp32 weights that need gradients: the eager path, gradients flow
    x = torch.randn(3, 8)
    layer(x).sum().backward()
    assert layer.weight.grad is not None
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_one_videos_global_frames_are_pooled_once_for_all_its_windows(tiny_model):
    feats = torch.randn(3, 5, 4, tiny_model.backbone._vision_dim())
    with torch.no_grad():
        torch.nn.init.normal_(tiny_model.fusion.up.weight)  # a global part that changes the tokens
        shared = tiny_model.video_tokens(feats[:, :2], feats[:1].expand(3, -1, -1, -1))
        separate = tiny_model.video_tokens(feats[:, :2], feats[:1].repeat(3, 1, 1, 1))
    torch.testing.assert_close(shared, separate)


def test_cpu_models_reuse_freed_memory_instead_of_faulting_it_in_again():
    """A CPU worker's start keeps freed blocks in the process (keep_freed_memory): a 64 MB activation
    allocated again and again is not faulted in from the kernel every time."""
    import subprocess
    import sys

    probe = (
        "import resource, torch\n"
        "import os\n"
        "from workers.stllm.cpu import tune_process\n"
        "from workers.stllm.cpu.memory import keep_freed_memory\n"
        "tune_process(keep_freed_memory=os.environ['KEEP'] == '1', kernels=False)\n"
        "print(keep_freed_memory() if os.environ['KEEP'] == '1' else False)\n"
        "for _ in range(5):\n"
        "    torch.ones(1 << 24)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(40):\n"
        "    torch.ones(1 << 24)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )

    def faults(keep: str) -> tuple[str, int]:
        env = {**__import__("os").environ, "KEEP": keep}
        out = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
        )
        tuned, count = out.stdout.split()
        return tuned, int(count)

    tuned, kept = faults("1")
    untuned, returned = faults("0")
    assert (tuned, untuned) == ("True", "False")
    assert returned >= 40 * 16_000  # 64 MB is 16k pages, faulted in again on every allocation
    assert kept < returned / 8  # faulted in a few times while the heap settles, then reused
