"""Fine-tuning on window-level yes/no examples: LoRA on the LLM plus the small trainable parts, ST-LLM
dynamic masking and MVM loss (switchable), global-local input, seeded, resumable from a checkpoint.

Frame features of the frozen vision encoder are computed once per video by the caller and passed in;
training touches only the projector, fusion MLP, MVM head and LoRA weights.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from workers.stllm.model import IGNORE, STLLM, WindowFeatures, with_motion


@dataclass(frozen=True)
class TrainOptions:
    """The knobs of :func:`train` (their defaults live with the caller: ``workers.schemas.TrainSettings``)."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    weight_decay: float
    masking: bool
    mvm: bool
    seed: int
    checkpoint_every: int
    answer_choices: bool  # cross-entropy over the yes/no tokens only, as inference normalises them
    paired: bool  # each drawn example comes with its window's opposite answer to another question
    # every drawn window answers every question of its batch (up to ``questions_per_step``) in one sequence,
    # side by side as scoring runs them; needs ``answer_choices``
    all_questions: bool = True
    questions_per_step: int = 8
    soft_targets: bool = True  # an example's ``target`` (where set) is what its P(yes) trains toward


@dataclass
class Example:
    video: int  # index into the list of WindowFeatures
    window: int
    question: str
    answer: str  # "yes" or "no": the side balanced sampling draws it from
    # the P(yes) it trains toward with TrainOptions.soft_targets (e.g. the share of the window its events
    # cover); None: 1 for yes, 0 for no
    target: float | None = None


def _encode_text(model: STLLM, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, labels = [], []
    eos = [model.tokenizer.eos_token_id] if model.tokenizer.eos_token_id is not None else []
    for ex in examples:
        prompt = model.question_ids(ex.question)
        answer = model.text_ids(ex.answer) + eos
        rows.append(prompt + answer)
        labels.append([IGNORE] * len(prompt) + answer)
    width = max(len(r) for r in rows)
    pad = model.tokenizer.pad_token_id or 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    lab = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (r, la) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(la)] = torch.tensor(la)
        mask[i, : len(r)] = 1
    return ids, lab, mask


def _tokens(model: STLLM, videos: list[WindowFeatures], keys: list[tuple[int, int]]) -> torch.Tensor:
    """The video tokens of (video, window) pairs, with their videos' global part where every one has it."""
    local = torch.stack([videos[v].windows[w] for v, w in keys])
    glob = None
    if all(len(videos[v].global_frames) for v, _ in keys):
        glob = torch.stack([videos[v].global_frames for v, _ in keys])
    return model.video_tokens(local, glob)


def balanced_batches(examples: list[Example], settings: TrainOptions) -> list[list[Example]]:
    """``steps`` batches drawn with a seeded RNG: each example picks a question (label) uniformly, then
    yes or no with equal chance, then one window of that kind, so rare events are seen as often as common
    ones.

    ``paired``: each draw also takes, from the same window, another question with the opposite answer
    (where the window has one). A model that answers from the video alone, whatever it is asked, then
    gains nothing: the pair differs only in the question, so the loss falls only as the model learns to
    read it."""
    rng = random.Random(settings.seed)
    by_question: dict[str, dict[str, list[Example]]] = {}
    by_window: dict[tuple[int, int], dict[str, list[Example]]] = {}
    for ex in examples:
        by_question.setdefault(ex.question, {"yes": [], "no": []})[ex.answer].append(ex)
        by_window.setdefault((ex.video, ex.window), {}).setdefault(ex.answer, []).append(ex)
    pools = [p for _, p in sorted(by_question.items()) if p["yes"] or p["no"]]
    if not pools:
        raise ValueError("no training examples")
    batches = []
    for _ in range(settings.steps):
        batch: list[Example] = []
        while len(batch) < settings.batch_size:
            pool = rng.choice(pools)
            kind = rng.choice([k for k in ("yes", "no") if pool[k]])
            ex = rng.choice(pool[kind])
            batch.append(ex)
            if settings.paired and len(batch) < settings.batch_size:
                other = [
                    x
                    for a, xs in by_window[(ex.video, ex.window)].items()
                    if a != ex.answer
                    for x in xs
                    if x.question != ex.question
                ]
                if other:
                    batch.append(rng.choice(other))
        batches.append(batch)
    return batches


def question_batches(
    examples: list[Example], settings: TrainOptions
) -> list[tuple[list[tuple[int, int]], list[str], list[list[float]]]]:
    """``steps`` batches of (windows, questions, targets) for :meth:`STLLM.questions_loss`: windows are drawn
    as :func:`balanced_batches` draws examples (a question uniformly, yes or no with equal chance, a window of
    that kind), and each window answers every question of its batch: the ones drawn, then others at random up
    to ``questions_per_step``. targets[i][j]: the P(yes) window i trains toward on question j (1 for yes, 0
    for no, the example's ``target`` with ``soft_targets``), -1 where it has no answer to it. So a window that
    is a yes to one question is a no to the others it shows nothing of: what tells the labels apart is in
    every step."""
    rng = random.Random(settings.seed)
    answers: dict[tuple[int, int], dict[str, float]] = {}
    by_question: dict[str, dict[str, list[tuple[int, int]]]] = {}
    for ex in examples:
        key = (ex.video, ex.window)
        hard = 1.0 if ex.answer == "yes" else 0.0
        soft = ex.target if settings.soft_targets and ex.target is not None else hard
        answers.setdefault(key, {})[ex.question] = min(1.0, max(0.0, float(soft)))
        by_question.setdefault(ex.question, {"yes": [], "no": []})[ex.answer].append(key)
    questions = sorted(by_question)
    if not questions:
        raise ValueError("no training examples")
    out = []
    for _ in range(settings.steps):
        keys, drawn = [], []
        for _ in range(settings.batch_size):
            q = rng.choice(questions)
            kind = rng.choice([k for k in ("yes", "no") if by_question[q][k]])
            keys.append(rng.choice(by_question[q][kind]))
            if q not in drawn:
                drawn.append(q)
        chosen = drawn[: settings.questions_per_step]
        rest = [q for q in questions if q not in chosen]
        rng.shuffle(rest)
        chosen += rest[: max(0, settings.questions_per_step - len(chosen))]
        targets = [[answers[k].get(q, -1.0) for q in chosen] for k in keys]
        out.append((keys, chosen, targets))
    return out


def input_blind_ce(batches: list[tuple[list, list[str], list[list[float]]]]) -> list[float]:
    """Per batch of :func:`question_batches`: the answer cross-entropy of the best model that ignores the
    video, the one that answers each question with its mean target over all the batches. A run that learned
    nothing from the pictures ends there, not at ln 2: with soft targets (or any question whose targets do
    not average 0.5) a model that answers each label's base rate already scores below chance."""
    sums: dict[str, list[float]] = {}
    for _, questions, targets in batches:
        for row in targets:
            for q, y in zip(questions, row, strict=True):
                if y >= 0:
                    acc = sums.setdefault(q, [0.0, 0.0])
                    acc[0] += y
                    acc[1] += 1
    mean = {q: min(max(a / n, 1e-6), 1 - 1e-6) for q, (a, n) in sums.items()}
    out = []
    for _, questions, targets in batches:
        terms = [
            -(y * math.log(mean[q]) + (1 - y) * math.log(1 - mean[q]))
            for row in targets
            for q, y in zip(questions, row, strict=True)
            if y >= 0
        ]
        out.append(sum(terms) / len(terms) if terms else math.log(2))
    return out


def fit_input_statistics(model: STLLM, videos: list[WindowFeatures], most: int = 1024) -> None:
    """Fit a connector's input standardizer (the builtin's ``"standardize"``) on the training windows' features,
    up to ``most`` windows spread evenly over them (the cost does not grow with the round). Nothing for a
    backbone without one, or one already fitted (a continued adapter keeps its statistics)."""
    standardizer = getattr(model.backbone, "standardizer", None)
    if standardizer is None or int(standardizer.fitted):
        return
    keys = [(v, w) for v, f in enumerate(videos) for w in range(len(f.windows))]
    keys = keys[:: max(1, len(keys) // most)][:most]
    x = torch.stack([videos[v].windows[w] for v, w in keys]).float()  # (N, F, K, Dv)
    if model.backbone.motion_input:
        x = with_motion(x, model.backbone.motion_magnitude)
    standardizer.fit(x.flatten(0, 2))


def train(
    model: STLLM,
    videos: list[WindowFeatures],
    examples: list[Example],
    settings: TrainOptions,
    checkpoint_dir: Path | None = None,
    progress: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """Train ``model`` in place; returns per-step losses. With ``checkpoint_dir``, state is saved every
    ``checkpoint_every`` steps and a rerun resumes from the last checkpoint (same batches, same result).

    On a CPU training computes in fp32 whatever the model's compute dtype (serving keeps it): the demo with
    bf16 autocast training ended at held-out mAP@0.5 0.289 / 0.001 (round 2's window AUCs 0.54-0.76), the
    same code with fp32 training at 0.350 / 0.613 (one run each; bench/README.md). GPUs keep bf16."""
    serving_dtype = model.compute_dtype
    if model.device.type == "cpu":
        model.compute_dtype = torch.float32
    try:
        return _train(model, videos, examples, settings, checkpoint_dir, progress)
    finally:
        model.compute_dtype = serving_dtype


def _train(
    model: STLLM,
    videos: list[WindowFeatures],
    examples: list[Example],
    settings: TrainOptions,
    checkpoint_dir: Path | None,
    progress: Callable[[int, dict], None] | None,
) -> list[dict]:
    torch.manual_seed(settings.seed)
    fit_input_statistics(model, videos)
    model.attach_lora()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)

    def lr_at(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        t = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(settings.seed)
    start, history = 0, []
    ckpt = checkpoint_dir / "checkpoint.pt" if checkpoint_dir else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state["settings"] != asdict(settings):
            raise ValueError(f"checkpoint {ckpt} was made with other settings: {state['settings']}")
        model.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        start, history = state["step"], state["history"]
    if settings.all_questions and not settings.answer_choices:
        raise ValueError("all_questions reads each answer as yes or no: it needs answer_choices")
    batches = (question_batches if settings.all_questions else balanced_batches)(examples, settings)
    yes_no = [model.text_ids("yes")[0], model.text_ids("no")[0]]
    if settings.all_questions and yes_no[0] == yes_no[1]:
        raise ValueError("'yes' and 'no' share their first token: train with all_questions=False")
    blind = input_blind_ce(batches) if settings.all_questions else None  # what a video-blind answer scores
    choices = None
    if settings.answer_choices:
        answers = sorted({ex.answer for ex in examples})
        choices = [model.text_ids(a)[0] for a in answers]
        if len(set(choices)) != len(choices):
            raise ValueError(f"answers {answers} share their first token: train with answer_choices=False")
    for step in range(start, settings.steps):
        if settings.all_questions:
            keys, questions, targets = batches[step]
            out = model.questions_loss(
                _tokens(model, videos, keys),
                questions,
                torch.tensor(targets, dtype=torch.float32),
                yes_no,
                masking=settings.masking,
                mvm=settings.mvm,
                generator=gen,
            )
        else:
            batch = batches[step]
            ids, labels, mask = _encode_text(model, batch)
            out = model.training_loss(
                _tokens(model, videos, [(ex.video, ex.window) for ex in batch]),
                ids,
                labels,
                mask,
                masking=settings.masking,
                mvm=settings.mvm,
                generator=gen,
                choices=choices,
            )
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        record = {k: round(float(v.detach()), 5) for k, v in out.items()}
        if blind is not None:
            record["blind_ce"] = round(blind[step], 5)
        history.append(record)
        if progress:
            progress(step + 1, record)
        if ckpt is not None and ((step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps):
            names = {n for n, p in model.named_parameters() if p.requires_grad}
            trainable = {k: v for k, v in model.state_dict().items() if k in names}
            tmp = ckpt.with_suffix(f".tmp{os.getpid()}")
            torch.save(
                {
                    "step": step + 1,
                    "model": trainable,
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "generator": gen.get_state(),
                    "history": history,
                    "settings": asdict(settings),
                },
                tmp,
            )
            tmp.replace(ckpt)
    model.eval()
    return history
