"""ST-LLM: every spatio-temporal token goes into the LLM (Liu et al., ECCV 2024).

    frames (B, T, 3, S, S) -> backbone -> tokens (B, T, K, D)
    global-local: local frames + up(relu(down(mean over all frames)))   (up zero-initialised)
    flatten frame-major -> (B, T*K, D), video first, then the question; 1-D positions 0..N-1
    (an instruct LM's chat header, e.g. its system turn, stays in front: [header][video][question][answer])
    training: dynamic masking drops a random share rho of video tokens (order kept),
              loss = CE(answer tokens) + w * MVM(student hidden at kept tokens vs no-grad teacher)

The four method pieces are short named functions in :mod:`workers.stllm.method`: ``fuse_global_local`` (in
:class:`GlobalLocalFusion`), ``sample_mask_ratio`` + ``keep_positions`` (dynamic masking) and ``mvm_loss``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from workers.stllm.backbones.base import Backbone
from workers.stllm.cpu import CpuServing, serve_on_cpu
from workers.stllm.method import (  # noqa: F401  (STLLMConfig and the pieces are the model's API too)
    GlobalLocalFusion,
    MVMHead,
    STLLMConfig,
    gather_tokens,
    keep_positions,
    mvm_loss,
    sample_mask_ratio,
)
from workers.stllm.video import preprocess_frames

IGNORE = -100
# Scoring runs a prefix of up to this many tokens in the same forward pass as the questions after it: fewer,
# larger calls. Past it, the one pass's masked attention costs more than it saves (a causal prefix alone lets
# attention skip its masked half). On a CPU the crossover was between 270 and 400 tokens at 5 questions
# (bench/README.md, bench/engine.py section).
ONE_PASS_MAX_PREFIX = 320


# ----------------------------------------------------------------------------------- the model


def with_motion(features: torch.Tensor, magnitude: bool = False) -> torch.Tensor:
    """(B, T, K, Dv) frame features -> (B, T, K, 2 Dv): each token with its change since the same token of the
    previous frame (0 for the first frame), or with the change's absolute value (``magnitude``: "nothing moves"
    is then a small input, which a signed change of random sign is not). For a backbone with ``motion_input``."""
    change = torch.zeros_like(features)
    change[:, 1:] = features[:, 1:] - features[:, :-1]
    return torch.cat([features, change.abs() if magnitude else change], -1)


@dataclass
class WindowFeatures:
    """Frozen-encoder features of one video for windowed inference and training."""

    windows: torch.Tensor  # (W, F, K, Dv): each window's frames, encoded as one clip
    global_frames: torch.Tensor  # (G, K, Dv): the frames the global part pools over (G may be 0)


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft reads transformers' deprecated ``is_gradient_checkpointing`` when it wraps a model, and the
    FutureWarning would reach every caller's terminal; nothing else is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


class STLLM(nn.Module):
    """A backbone under the ST-LLM method, plus LoRA on its language model.

    Holds the trainable parts that are not LoRA: the backbone's projector/connector, the global-local
    fusion MLP and the MVM head. ``compute_dtype`` (bf16 or fp32) is used through autocast on CUDA and
    on CPUs with bf16 matrix units; weights stay fp32 unless :meth:`inference_weights` is called.
    """

    def __init__(self, backbone: Backbone, config: STLLMConfig | None = None):
        super().__init__()
        self.config = config or STLLMConfig()
        self.backbone = backbone
        dim = backbone.hidden_size
        self.fusion = GlobalLocalFusion(dim, min(self.config.global_bottleneck, dim))
        self.mvm_head = MVMHead(dim)
        self.lm = backbone.decoder  # replaced by a peft model when LoRA is attached
        self.merged_adapter: str | None = None  # the adapter merged into the decoder's weights (load_lora)
        self.compute_dtype = torch.float32
        self.version = "base"
        # what its round chose for pre-labeling with it: {"window_s", "stride_s", "thresholds": {label: P}}
        self.prelabel_defaults: dict = {}
        head, tail = backbone.prompt_parts()
        self.prompt_head, self.prompt_mid, self.prompt_tail = head, backbone.prompt_mid, tail

    # ------------------------------------------------------------------ parts
    @property
    def tokenizer(self):
        return self.backbone.tokenizer

    @property
    def device(self) -> torch.device:
        return self.backbone.lm_head.weight.device

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Non-LoRA modules that training updates and a model directory saves."""
        return {**self.backbone.trainable_modules(), "fusion": self.fusion, "mvm_head": self.mvm_head}

    def train(self, mode: bool = True) -> STLLM:
        """Train mode for what trains (the LM with its LoRA, the connector, fusion and MVM head); the frozen
        encoder parts (vision tower, temporal adapter, Q-Former) stay in eval mode, as the original pins them:
        their dropout is off, so a training step sees the features inference sees."""
        super().train(mode)
        for module in self.backbone.frozen_modules():
            module.eval()
        return self

    def attach_lora(self) -> None:
        """Wrap the LM decoder with fresh LoRA adapters (peft); the base weights stay frozen."""
        from peft import LoraConfig, get_peft_model

        if hasattr(self.lm, "peft_config"):
            return
        c = self.config
        lora = LoraConfig(
            r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout, target_modules=c.lora_targets
        )
        with _quiet_peft():
            self.lm = get_peft_model(self.backbone.decoder, lora)

    def load_lora(self, adapter_dir: str, trainable: bool = False) -> None:
        """Load a saved LoRA adapter onto the decoder: ``trainable`` to continue training it, else merged
        into the decoder's weights for serving (plain linear layers: no per-layer adapter calls, and the CPU
        hook's fused kernels apply to them as to the base model's). A merged model cannot be saved again."""
        from peft import PeftModel

        with _quiet_peft():
            lm = PeftModel.from_pretrained(self.backbone.decoder, adapter_dir, is_trainable=trainable)
        self.lm = lm if trainable else lm.merge_and_unload()
        self.merged_adapter = None if trainable else adapter_dir

    def inference_weights(self, cpu: CpuServing | None = None) -> STLLM:
        """Store every weight in the compute dtype (bf16 on GPUs and bf16-capable CPUs) for serving: half the
        memory, and no per-call weight casts under autocast. On a CPU, linear layers and MLPs then run
        oneDNN's fused kernels and, where the CPU has AMX, attention (the vision tower's, the decoder's scoring
        pass) and RMSNorm run the tile kernels: the one CPU hook, :func:`workers.stllm.cpu.serve_on_cpu`, with
        ``cpu``'s switches. Inference only: training keeps fp32 weights."""
        if self.compute_dtype != torch.float32:
            self.to(self.compute_dtype)
            if self.device.type == "cpu":
                serve_on_cpu(self, cpu)
        return self

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def question_ids(self, question: str, answer_prefix: str = "") -> list[int]:
        """Token ids of what follows the video: the question in the backbone's prompt format, then
        ``answer_prefix`` (the start of the answer, e.g. ``"Best option:("``)."""
        return self.text_ids(self.prompt_mid + question + self.prompt_tail + answer_prefix)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids.to(self.device))

    # ------------------------------------------------------------------ video tokens
    def vision_features(self, pixels: torch.Tensor, clip: int | None = None) -> torch.Tensor:
        """Frozen encoder features (N, K, Dv) for preprocessed frames (N, 3, S, S) that form clips of ``clip``
        frames (see ``Backbone.vision_features``): cache these."""
        with torch.no_grad(), self.autocast():
            return self.backbone.vision_features(pixels.to(self.device), clip).float()

    def encoder_chunk(self) -> int:
        """Frames per vision-encoder call: 64 on a GPU; 16 on a CPU, where a convolutional encoder's
        activations for 64 frames (hundreds of MB at 224 px) left the heap ~1 GB larger after a few
        streamed parts of a long video, and 16 was no slower (bench/README.md, long-video memory)."""
        return 64 if self.device.type == "cuda" else 16

    def frame_features(self, frames: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """uint8 frames (T, H, W, 3) in time order -> frozen encoder features (T, K, Dv), ``chunk`` frames per
        encoder call. An encoder that mixes frames over time sees them as consecutive clips of at most
        ``backbone.clip_frames``. Frames move to the model's device as uint8 and are resized there (on a GPU,
        resizing on the CPU took longer than the encoder). ``chunk`` defaults to :meth:`encoder_chunk`."""
        chunk = chunk or self.encoder_chunk()
        if self.backbone.clip_frames is not None:
            return self.clip_features(frames, torch.arange(frames.shape[0])[None], chunk)[0]
        bb = self.backbone
        parts = []
        for i in range(0, frames.shape[0], chunk):
            pixels = preprocess_frames(
                frames[i : i + chunk].to(self.device), bb.image_size, bb.image_mean, bb.image_std
            )
            parts.append(self.vision_features(pixels))
        return torch.cat(parts)

    def clip_features(
        self, frames: torch.Tensor, clips: torch.Tensor, chunk: int | None = None
    ) -> torch.Tensor:
        """uint8 frames (N, H, W, 3) and clips (C, F) of indices into them -> features (C, F, K, Dv), each clip
        encoded on its own: a temporal adapter attends within a clip, never across clips. A clip longer than
        ``backbone.clip_frames`` is split into consecutive pieces of at most that many frames. About ``chunk``
        frames go through the encoder per call (default :meth:`encoder_chunk`)."""
        chunk = chunk or self.encoder_chunk()
        bb = self.backbone
        if bb.clip_frames is None:  # frames are encoded alone: each distinct frame once
            used, where = clips.unique(return_inverse=True)
            return self.frame_features(frames[used], chunk)[where]
        parts = []
        for a in range(0, clips.shape[1], bb.clip_frames):
            piece = clips[:, a : a + bb.clip_frames]  # (C, t)
            t = piece.shape[1]
            rows = max(1, chunk // t)
            out = []
            for r in range(0, len(piece), rows):
                pixels = preprocess_frames(
                    frames[piece[r : r + rows].reshape(-1)].to(self.device),
                    bb.image_size,
                    bb.image_mean,
                    bb.image_std,
                )
                feats = self.vision_features(pixels, clip=t)
                out.append(feats.view(-1, t, *feats.shape[1:]))
            parts.append(torch.cat(out))
        return torch.cat(parts, 1)

    def window_features(
        self, frames: torch.Tensor, window_index: torch.Tensor, global_index: torch.Tensor
    ) -> WindowFeatures:
        """Encoder features of a video's windows (``window_index`` (W, F) into ``frames``) and of its global
        frames (``global_index`` (G,)): each window is its own clip, the global frames another."""
        if self.backbone.clip_frames is None:  # no clip mixing: encode the frames once, windows index them
            f = self.frame_features(frames)
            return WindowFeatures(f[window_index], f[global_index])
        local = self.clip_features(frames, window_index)
        if not len(global_index):
            return WindowFeatures(local, local.new_zeros((0, *local.shape[2:])))
        return WindowFeatures(local, self.clip_features(frames, global_index[None])[0])

    def video_tokens(
        self, local: torch.Tensor, global_frames: torch.Tensor | None = None, text: str | None = None
    ) -> torch.Tensor:
        """Frame features -> the video's LLM input, frame-major.

        local: (B, T, K, Dv) features of the frames kept at full tokens; global_frames: (B, Tg, K, Dv) features
        of all frames the global part pools over (None: no global part). The global part is the mean over
        frames of the projected tokens (``config.global_mean == "tokens"``, the original's, what a converted
        release uses) or the projection of the mean feature (``"features"``, fresh models; see STLLMConfig).
        ``text``: what a question-aware connector reads (None: its fixed instruction).
        Returns (B, T*K, D).
        """
        b, t = local.shape[:2]
        weights = next(self.fusion.parameters()).dtype  # bf16 after inference_weights(), else fp32
        if self.backbone.motion_input:
            local = with_motion(local, self.backbone.motion_magnitude)
        tokens = self.backbone.project(
            local.to(weights).flatten(0, 1), text
        )  # (B*T, K, D): K may differ from the feature count
        tokens = tokens.view(b, t, *tokens.shape[1:])
        if global_frames is not None:
            if b > 1 and global_frames.stride(0) == 0:  # one video's frames expanded over its windows:
                global_frames = global_frames[:1]  # project and pool them once
            if self.backbone.motion_input:
                global_frames = with_motion(global_frames, self.backbone.motion_magnitude)
            if self.config.global_mean == "tokens":  # project every frame, then the mean (the original)
                gb, tg = global_frames.shape[:2]
                projected = self.backbone.project(global_frames.to(weights).flatten(0, 1), text)
                g = projected.view(gb, tg, *projected.shape[1:]).mean(1)
            else:  # the mean of the frames' features, projected once
                g = self.backbone.project(global_frames.mean(1).to(weights), text)
            tokens = self.fusion(tokens, g.expand(b, -1, -1))
        return tokens.flatten(1, 2)

    # ------------------------------------------------------------------ training
    def training_loss(
        self,
        video: torch.Tensor,
        text_ids: torch.Tensor,
        labels: torch.Tensor,
        text_mask: torch.Tensor,
        masking: bool = True,
        mvm: bool = True,
        generator: torch.Generator | None = None,
        choices: list[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """ST-LLM's training objective for a batch.

        video: (B, L, D) from :meth:`video_tokens`; text_ids/labels/text_mask: (B, S) right-padded question,
        prompt tail and answer after the video, labels IGNORE except on answer tokens (the chat header in
        front of the video is added here). With ``masking`` a share rho of video tokens is
        dropped (one rho per batch); with ``mvm`` too, a no-grad teacher pass on the full input supervises the
        student's hidden states at the kept video tokens. With ``choices`` (token ids, e.g. of "yes" and "no")
        the cross-entropy is taken over those tokens only, at the answer positions whose label is one of
        them: the same normalisation the option scoring uses at inference. Returns loss, ce, mvm (0 when
        off) and rho.
        """
        device = self.device
        b, length, _ = video.shape
        text_ids, labels, text_mask = text_ids.to(device), labels.to(device), text_mask.to(device)
        head = self._head_embeds(b).to(video.dtype)
        h = head.shape[1]
        text = self.embed(text_ids)
        rho = sample_mask_ratio(self.config, generator) if masking else 0.0
        keep = keep_positions(b, length, rho, generator) if masking else None
        student_video = gather_tokens(video, keep) if masking else video
        n_vid = student_video.shape[1]

        def forward(vid: torch.Tensor) -> torch.Tensor:
            inputs = torch.cat([head, vid, text.to(vid.dtype)], 1)
            ones = torch.ones(b, h + vid.shape[1], dtype=text_mask.dtype, device=device)
            return self.lm(
                inputs_embeds=inputs, attention_mask=torch.cat([ones, text_mask], 1)
            ).last_hidden_state

        with self.autocast():
            hidden = forward(student_video)
            ce = self._answer_ce(hidden[:, h + n_vid - 1 :], labels, choices)
            mvm_term = torch.zeros((), device=device)
            if masking and mvm and self.config.mvm_weight > 0:
                with torch.no_grad():
                    teacher = gather_tokens(forward(video)[:, h : h + length], keep)
                mvm_term = mvm_loss(self.mvm_head(hidden[:, h : h + n_vid]), teacher)
        loss = ce + self.config.mvm_weight * mvm_term
        return {"loss": loss, "ce": ce.detach(), "mvm": mvm_term.detach(), "rho": torch.tensor(rho)}

    def questions_loss(
        self,
        video: torch.Tensor,
        questions: list[str],
        targets: torch.Tensor,
        choices: list[int],
        masking: bool = True,
        mvm: bool = True,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """ST-LLM's training objective with every question of a window in one sequence, laid out as
        :meth:`score` lays them out: the chat header, the (masked) video and the start every question shares
        come once; each question follows side by side under a block mask, and its answer is read off its last
        position as the cross-entropy over ``choices`` (token ids, e.g. of "yes" and "no").

        video: (B, L, D) from :meth:`video_tokens`; targets: (B, Q), each window's answer to each question,
        -1 where it has none (left out of the loss): long, the index into ``choices``; or float, the
        probability of ``choices[0]`` to train toward (two choices: e.g. P(yes) = the share of the window
        the events cover), the cross-entropy against that soft target. Masking and MVM as in
        :meth:`training_loss`; the teacher pass runs the header and the full video only. One step supervises
        B x Q answers for about the cost of B one-question sequences with twice the text."""
        device = self.device
        b, length, _ = video.shape
        q_ids = [self.question_ids(q) for q in questions]
        shared = min(len(os.path.commonprefix(q_ids)), min(len(q) for q in q_ids) - 1)
        after, rows = q_ids[0][:shared], [q[shared:] for q in q_ids]
        targets = targets.to(device)
        head = self._head_embeds(b).to(video.dtype)
        h = head.shape[1]
        rho = sample_mask_ratio(self.config, generator) if masking else 0.0
        keep = keep_positions(b, length, rho, generator) if masking else None
        student_video = gather_tokens(video, keep) if masking else video
        n_vid = student_video.shape[1]
        after_embeds = self.embed(torch.tensor([after], dtype=torch.long).view(1, -1)).expand(b, -1, -1)
        plen = h + n_vid + len(after)
        ids, positions, mask = self._side_by_side(rows, plen, with_prefix=True)
        starts = list(itertools.accumulate(map(len, rows), initial=0))
        last = torch.tensor([plen + starts[i] + len(r) - 1 for i, r in enumerate(rows)], device=device)
        with self.autocast():
            inputs = torch.cat(
                [
                    head,
                    student_video,
                    after_embeds.to(video.dtype),
                    self.embed(ids).to(video.dtype).expand(b, -1, -1),
                ],
                1,
            )
            hidden = self.lm(
                inputs_embeds=inputs,
                attention_mask=mask.to(device).expand(b, -1, -1, -1),
                position_ids=positions.to(device).expand(b, -1),
                use_cache=False,
            ).last_hidden_state
            where = targets >= 0
            options = torch.tensor(choices, device=device)
            logits = self.backbone.lm_head(hidden[:, last][where])[:, options]
            if targets.is_floating_point():  # P(choices[0]); the other choice gets the rest
                if len(choices) != 2:
                    raise ValueError(f"soft targets need two choices, got {len(choices)}")
                t = targets[where].float()
                ce = F.cross_entropy(logits.float(), torch.stack([t, 1 - t], 1))
            else:
                ce = F.cross_entropy(logits.float(), targets[where])
            mvm_term = torch.zeros((), device=device)
            if masking and mvm and self.config.mvm_weight > 0:
                with torch.no_grad():
                    full = self.lm(inputs_embeds=torch.cat([head, video], 1)).last_hidden_state
                    teacher = gather_tokens(full[:, h:], keep)
                mvm_term = mvm_loss(self.mvm_head(hidden[:, h : h + n_vid]), teacher)
        loss = ce + self.config.mvm_weight * mvm_term
        return {"loss": loss, "ce": ce.detach(), "mvm": mvm_term.detach(), "rho": torch.tensor(rho)}

    def _answer_ce(
        self, hidden: torch.Tensor, labels: torch.Tensor, choices: list[int] | None = None
    ) -> torch.Tensor:
        """Cross-entropy of the answer tokens. hidden[:, i] predicts labels[:, i] (hidden starts one position
        before the text). The LM head runs only where a label is set: a 49k vocabulary over every position
        would dominate the step."""
        hidden = hidden[:, : labels.shape[1]]
        if choices is None:
            where = labels != IGNORE
            logits = self.backbone.lm_head(hidden[where])
            return F.cross_entropy(logits.float(), labels[where])
        options = torch.tensor(choices, device=labels.device)
        where = (labels.unsqueeze(-1) == options).any(-1)
        logits = self.backbone.lm_head(hidden[where])[:, options]
        target = (labels[where].unsqueeze(-1) == options).float().argmax(-1)
        return F.cross_entropy(logits.float(), target)

    # ------------------------------------------------------------------ scoring and generation
    def _head_embeds(self, batch: int) -> torch.Tensor:
        """(B, H, D) embeddings of the chat header that precedes the video (H may be 0)."""
        ids = torch.tensor([self.text_ids(self.prompt_head)] * batch, dtype=torch.long).view(batch, -1)
        return self.embed(ids)

    def _prefix_embeds(self, video: torch.Tensor, after: list[int] | None = None) -> torch.Tensor:
        """(B, P, D) embeddings of what every continuation follows: the chat header, the video (B, L, D), then
        the token ids ``after`` (e.g. the start every question shares), in the video's dtype."""
        inputs = video.to(self.device)
        after_ids = torch.tensor([after or []], dtype=torch.long).view(1, -1)
        parts = [
            self._head_embeds(video.shape[0]),
            inputs,
            self.embed(after_ids).expand(video.shape[0], -1, -1),
        ]
        return torch.cat([part.to(inputs.dtype) for part in parts], 1)

    @torch.inference_mode()
    def score(
        self,
        video: torch.Tensor,
        queries: list[str],
        candidates: list[str],
        answer_prefix: str = "",
        shared_start: bool = True,
        in_context: bool = False,
    ) -> torch.Tensor:
        """log P(candidate | video, query) for every video, query and candidate: (B, Q, C).

        The video + prompt head, and the tokens every query starts with ("Does this clip show"), come once
        per video; every (query, candidate) continuation follows them side by side in the same sequence, each
        attending to that prefix and to itself only (a block mask; positions restart after the prefix for
        each). So the prefix is computed once and never copied per query or padded. A prefix of up to
        ``ONE_PASS_MAX_PREFIX`` tokens (a pre-label window) runs in one forward pass with its continuations; a
        longer one (asking over a whole video) runs first on its own, causal, and the continuations follow
        over its KV cache. Candidates that are single tokens (the yes/no case) are read off the query's last
        position, so that case needs one continuation per query, not per candidate. ``shared_start=False``
        runs every query from its first token instead (same result; for benchmarks). ``in_context``: each
        candidate is the tokens it becomes after the (first) query and ``answer_prefix`` (a SentencePiece
        tokenizer spells "A" after "(" as one token, "A" alone as "▁", "A"); default: tokenized alone, as
        training spells its answers.
        """
        b = video.shape[0]
        q_ids = [self.question_ids(q, answer_prefix) for q in queries]
        c_ids = [self.text_ids(c) for c in candidates]
        if in_context:
            c_ids = [
                self._continuation(queries[0], answer_prefix, c) or ids
                for c, ids in zip(candidates, c_ids, strict=True)
            ]
        if any(len(q) == 0 for q in q_ids):
            raise ValueError("every query needs at least one token")
        if any(len(c) == 0 for c in c_ids):
            raise ValueError("every candidate needs at least one token")
        # the shared start goes into the prefix; each query keeps at least its last token, where scoring reads
        shared = min(len(os.path.commonprefix(q_ids)), min(len(q) for q in q_ids) - 1) if shared_start else 0
        after, q_ids = q_ids[0][:shared], [q[shared:] for q in q_ids]
        single = all(len(c) == 1 for c in c_ids)
        rows = list(q_ids) if single else [q + c for q in q_ids for c in c_ids]
        with self.autocast():
            prefix = self._prefix_embeds(video, after)
            plen = prefix.shape[1]
            one_pass = plen <= ONE_PASS_MAX_PREFIX
            ids, positions, mask = self._side_by_side(rows, plen, with_prefix=one_pass)
            text = self.embed(ids).to(prefix.dtype).expand(b, -1, -1)
            mask, positions = mask.to(self.device), positions.to(self.device)
            if one_pass:
                hidden = self.lm(
                    inputs_embeds=torch.cat([prefix, text], 1),
                    attention_mask=mask.expand(b, -1, -1, -1),
                    position_ids=positions.expand(b, -1),
                    use_cache=False,
                ).last_hidden_state[:, plen:]
            else:  # the prefix alone first (causal: attention skips its masked half), the rows over its cache
                cache = self.lm(inputs_embeds=prefix, use_cache=True).cache
                hidden = self.lm(
                    inputs_embeds=text,
                    attention_mask=mask.expand(b, -1, -1, -1),
                    position_ids=positions.expand(b, -1),
                    cache=cache,
                    use_cache=True,
                ).last_hidden_state
        starts = list(itertools.accumulate(map(len, rows), initial=0))  # where each row begins
        if single:
            last = torch.tensor([starts[i] + len(q) - 1 for i, q in enumerate(q_ids)], device=hidden.device)
            logp = self.backbone.lm_head(hidden[:, last]).float().log_softmax(-1)  # (b, Q, V)
            cand = torch.tensor([c[0] for c in c_ids], device=logp.device)
            return logp[..., cand].cpu()
        # Multi-token candidates: row (q, c) scores c's tokens, each read off the position before it.
        read, target, owner = [], [], []
        for i, row in enumerate(rows):
            q, c = q_ids[i // len(c_ids)], c_ids[i % len(c_ids)]
            read += range(starts[i] + len(q) - 1, starts[i] + len(row) - 1)
            target += c
            owner += [i] * len(c)
        logp = (
            self.backbone.lm_head(hidden[:, torch.tensor(read, device=hidden.device)]).float().log_softmax(-1)
        )
        picked = logp.gather(2, torch.tensor(target, device=logp.device).expand(b, -1).unsqueeze(2))[..., 0]
        scores = torch.zeros(b, len(rows), device=logp.device).index_add_(
            1, torch.tensor(owner, device=logp.device), picked
        )
        return scores.view(b, len(queries), len(candidates)).cpu()

    def _continuation(self, query: str, answer_prefix: str, candidate: str) -> list[int]:
        """The token ids ``candidate`` adds after ``query`` and ``answer_prefix`` ([] where tokenizing them
        together changes the tokens before it)."""
        before = self.question_ids(query, answer_prefix)
        after = self.question_ids(query, answer_prefix + candidate)
        return after[len(before) :] if after[: len(before)] == before else []

    def _side_by_side(
        self, rows: list[list[int]], plen: int, with_prefix: bool = True
    ) -> tuple[torch.Tensor, ...]:
        """Token ids (1, R) of ``rows`` (token id lists that each continue the same prefix of ``plen``
        tokens) laid end to end, and the position ids (1, N) and additive attention mask (1, 1, N, plen + R)
        that run them as one sequence after the prefix: every row sees the whole prefix and its own earlier
        tokens, never another row's, its positions restarting where the prefix ends. ``with_prefix``: the
        prefix's own positions and causal mask rows come first (N = plen + R, prefix and rows in one pass);
        else N = R (the rows over the prefix's cache)."""
        ids = torch.tensor([[t for r in rows for t in r]], dtype=torch.long)
        owner = torch.cat([torch.full((plen,), -1)] + [torch.full((len(r),), i) for i, r in enumerate(rows)])
        positions = torch.cat([torch.arange(plen)] + [plen + torch.arange(len(r)) for r in rows])
        first = 0 if with_prefix else plen  # the first position that runs in this pass
        query, key = torch.arange(first, len(owner))[:, None], torch.arange(len(owner))[None, :]
        seen = (key <= query) & ((owner[key] == -1) | (owner[query] == owner[key]))
        # additive, in the dtype attention runs in: SDPA and eager attention both take it
        blocked = torch.finfo(self.compute_dtype).min
        mask = torch.zeros(seen.shape, dtype=self.compute_dtype).masked_fill_(~seen, blocked)
        return ids, positions[None, first:], mask[None, None]

    @torch.inference_mode()
    def generate(
        self, video: torch.Tensor, question: str, max_new_tokens: int = 48, answer_prefix: str = ""
    ) -> list[str]:
        """Greedy free-text answers to ``question`` for each video in the batch (B, L, D), continuing
        ``answer_prefix`` (not repeated in the answer)."""
        b = video.shape[0]
        with self.autocast():
            prefix = self._prefix_embeds(video)
            cache, plen = self.lm(inputs_embeds=prefix, use_cache=True).cache, prefix.shape[1]
        q = torch.tensor([self.question_ids(question, answer_prefix)] * b)
        eos = self.tokenizer.eos_token_id
        done = torch.zeros(b, dtype=torch.bool)
        answers: list[list[int]] = [[] for _ in range(b)]
        step_ids, pos = q, plen
        with self.autocast():
            for _ in range(max_new_tokens):
                n = step_ids.shape[1]
                positions = (pos + torch.arange(n)).unsqueeze(0).expand(b, -1).to(self.device)
                out = self.lm(
                    inputs_embeds=self.embed(step_ids), position_ids=positions, cache=cache, use_cache=True
                )
                pos += n
                nxt = self.backbone.lm_head(out.last_hidden_state[:, -1]).argmax(-1).cpu()
                for i in range(b):
                    if not done[i]:
                        if int(nxt[i]) == eos:
                            done[i] = True
                        else:
                            answers[i].append(int(nxt[i]))
                if bool(done.all()):
                    break
                step_ids = nxt.unsqueeze(1)
        return [self.tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]
