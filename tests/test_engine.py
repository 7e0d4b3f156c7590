"""The ST-LLM engine: method pieces, cached scoring, training, save/load."""

from __future__ import annotations

import pytest
import torch

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


def test_all_questions_in_one_sequence_give_each_questions_own_loss(tiny_model):
    """questions_loss lays a window's questions side by side after one video prefix; each answer's loss is the
    loss of that question asked alone (as scoring reads it), and unclear targets (-1) are left out."""
    import torch.nn.functional as F

    model = tiny_model
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 2, 4, 32, generator=g)
    video = model.video_tokens(feats)
    questions = ["Is it bright?", "Is it dark and cold?", "Is there a hand?"]
    targets = torch.tensor([[0, 1, -1], [1, -1, 0], [0, 0, 1]])
    yes, no = model.text_ids("y"), model.text_ids("n")  # single tokens for the tiny byte tokenizer
    assert len(yes) == len(no) == 1
    yes, no = yes[0], no[0]
    out = model.questions_loss(video, questions, targets, [yes, no], masking=False)
    logp = model.score(video, questions, ["y", "n"])  # (B, Q, 2), each question alone after the video
    expected = []
    for b in range(3):
        for q in range(3):
            if targets[b, q] >= 0:
                expected.append(F.cross_entropy(logp[b, q][None], targets[b, q][None]))
    assert out["ce"].item() == pytest.approx(torch.stack(expected).mean().item(), abs=1e-4)
    assert out["mvm"].item() == 0.0
    masked = model.questions_loss(video, questions, targets, [yes, no], generator=g)
    assert masked["mvm"].item() > 0 and 0.1 <= masked["rho"].item() <= 0.7
    masked["loss"].backward()
    # float targets: P(first choice); hard ones give the same loss, a soft one its cross-entropy
    as_p = torch.where(targets >= 0, 1.0 - targets.float(), -1.0)
    same = model.questions_loss(video, questions, as_p, [yes, no], masking=False)
    assert same["ce"].item() == pytest.approx(out["ce"].item(), abs=1e-4)
    soft = torch.full((3, 3), -1.0)
    soft[0, 0] = 0.3
    half = model.questions_loss(video, questions, soft, [yes, no], masking=False)
    lp = F.log_softmax(logp[0, 0], -1)
    want = -(0.3 * lp[0] + 0.7 * lp[1])
    assert half["ce"].item() == pytest.approx(want.item(), abs=1e-4)


def test_motion_input_gives_the_connector_each_tokens_change(tiny_spec):
    from workers.stllm.io import build_model
    from workers.stllm.model import with_motion

    feats = torch.randn(2, 3, 4, 32)
    both = with_motion(feats)
    assert both.shape == (2, 3, 4, 64)
    assert torch.equal(both[:, 0, :, 32:], torch.zeros(2, 4, 32))
    assert torch.allclose(both[:, 2, :, 32:], feats[:, 2] - feats[:, 1])
    model = build_model({**tiny_spec, "motion": True}, device="cpu", dtype="fp32").eval()
    assert model.backbone.motion_input and model.backbone.projector[0].in_features == 64
    # a frozen picture and a moving one whose last frame is the same: only the change tells them apart
    still = feats[:, 2:3].expand(-1, 3, -1, -1).contiguous()
    moving = feats.clone()
    a, b = model.video_tokens(still), model.video_tokens(moving)
    k = model.backbone.tokens_per_frame
    assert not torch.allclose(a[:, 2 * k :], b[:, 2 * k :])
    plain = build_model(tiny_spec, device="cpu", dtype="fp32").eval()
    assert torch.allclose(plain.video_tokens(still)[:, 2 * k :], plain.video_tokens(moving)[:, 2 * k :])


def test_motion_magnitude_gives_the_connector_how_much_each_token_changed(tiny_spec):
    from workers.stllm.io import build_model
    from workers.stllm.model import with_motion

    feats = torch.randn(2, 3, 4, 32)
    mag = with_motion(feats, magnitude=True)
    assert torch.allclose(mag[:, 2, :, 32:], (feats[:, 2] - feats[:, 1]).abs())
    assert bool((mag[..., 32:] >= 0).all())
    model = build_model({**tiny_spec, "motion": "magnitude"}, device="cpu", dtype="fp32").eval()
    assert model.backbone.motion_input and model.backbone.motion_magnitude
    # a change and its opposite are the same amount of motion
    back = torch.stack([feats[:, 0], feats[:, 1], feats[:, 0]], 1)
    fwd = torch.stack([feats[:, 0], feats[:, 1], 2 * feats[:, 1] - feats[:, 0]], 1)
    k = model.backbone.tokens_per_frame
    assert torch.allclose(
        with_motion(back, True)[:, 2, :, 32:], with_motion(fwd, True)[:, 2, :, 32:], atol=1e-5
    )
    signed = build_model({**tiny_spec, "motion": True}, device="cpu", dtype="fp32").eval()
    assert not signed.backbone.motion_magnitude
    assert model.video_tokens(feats).shape == signed.video_tokens(feats).shape
    assert model.video_tokens(feats).shape[:2] == (2, 3 * k)
    with pytest.raises(ValueError, match="magnitude"):
        build_model({**tiny_spec, "motion": "magnitud"}, device="cpu", dtype="fp32")


def test_masking_off_gives_no_mvm_term(tiny_model):
    feats, ids, lab, mask = _toy_batch(tiny_model, 2, torch.Generator().manual_seed(0))
    video = tiny_model.video_tokens(feats)
    out = tiny_model.training_loss(video, ids, lab, mask, masking=False)
    assert out["mvm"].item() == 0.0 and out["rho"].item() == 0.0
    out = tiny_model.training_loss(video, ids, lab, mask, masking=True, mvm=False)
    assert out["mvm"].item() == 0.0 and out["rho"].item() > 0


def test_save_load_round_trip_gives_identical_outputs(tiny_model, tmp_path):
    """Loaded to train on, a saved model answers bit for bit as before; loaded to serve, its adapter is merged
    into the decoder (no LoRA layer is left) and it answers the same up to float rounding."""
    model = tiny_model
    model.attach_lora()
    for p in model.parameters():  # make every trainable part non-trivial, LoRA B included
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    model.eval()
    feats = torch.randn(2, 3, 4, 32)
    before = model.score(model.video_tokens(feats, feats), ["Is it?"], ["yes", "no"])
    save_model(model, tmp_path / "m", version="round-7")
    assert (tmp_path / "m" / "adapter" / "adapter_config.json").exists()
    again = load_model(tmp_path / "m", device="cpu", trainable=True).eval()
    assert again.version == "round-7"
    after = again.score(again.video_tokens(feats, feats), ["Is it?"], ["yes", "no"])
    torch.testing.assert_close(before, after, atol=0, rtol=0)
    served = load_model(tmp_path / "m", device="cpu")
    assert served.version == "round-7" and served.merged_adapter
    assert not any("lora" in name for name, _ in served.named_modules())
    merged = served.score(served.video_tokens(feats, feats), ["Is it?"], ["yes", "no"])
    torch.testing.assert_close(before, merged, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="trainable=True"):
        save_model(served, tmp_path / "again")


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


def test_one_videos_global_frames_are_pooled_once_for_all_its_windows(tiny_model):
    feats = torch.randn(3, 5, 4, tiny_model.backbone._vision_dim())
    with torch.no_grad():
        torch.nn.init.normal_(tiny_model.fusion.up.weight)  # a global part that changes the tokens
        shared = tiny_model.video_tokens(feats[:, :2], feats[:1].expand(3, -1, -1, -1))
        separate = tiny_model.video_tokens(feats[:, :2], feats[:1].repeat(3, 1, 1, 1))
    torch.testing.assert_close(shared, separate)


def test_input_standardizer_is_the_identity_until_fitted_then_centres_and_scales_once():
    import torch

    from workers.stllm.backbones.composed import InputStandardizer

    s = InputStandardizer(3)
    x = torch.tensor([[1.0, 10.0, -5.0], [3.0, 30.0, -5.0], [5.0, 50.0, -5.0]])
    assert torch.equal(s(x), x)
    s.fit(x)
    y = s(x)
    assert torch.allclose(y.mean(0), torch.zeros(3), atol=1e-6)
    assert (
        torch.allclose(y[:, :2].std(0), torch.ones(2)) and torch.isfinite(y).all()
    )  # a constant dim stays finite
    s.fit(x * 100)  # fitted once: a continued adapter keeps the statistics it was trained on
    assert torch.allclose(s(x), y)
    t = InputStandardizer(3)
    t.load_state_dict(s.state_dict())
    assert torch.allclose(t(x), y) and int(t.fitted) == 1
