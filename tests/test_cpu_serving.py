"""CPU serving (workers.stllm.cpu): fused layers match the eager path; the process-wide malloc tuning."""

from __future__ import annotations

import torch

from workers.stllm.cpu import CpuServing
from workers.stllm.io import build_model, load_model, save_model


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
    """A fine-tuned version (LoRA adapters on the decoder) loaded for serving: the adapters are merged into
    the decoder's layers, the fused kernels and packed weights reach those layers, and the scores match the
    eager bf16 path."""
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
    assert fused_model.merged_adapter and not any("lora" in n for n, _ in fused_model.named_modules())
    adapted = [
        m for n, m in fused_model.lm.named_modules() if n.endswith(tuple(fused_model.config.lora_targets))
    ]
    assert adapted and all(isinstance(m, FusedLinear) for m in adapted)
    torch.testing.assert_close(fused, eager, atol=0.05, rtol=0)


def test_fused_linear_falls_back_to_eager_for_autograd_and_fp32():
    from workers.stllm.cpu.fused import FusedLinear

    layer = torch.nn.Linear(8, 4)
    layer.__class__ = FusedLinear  # fp32 weights that need gradients: the eager path, gradients flow
    x = torch.randn(3, 8)
    layer(x).sum().backward()
    assert layer.weight.grad is not None
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


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
