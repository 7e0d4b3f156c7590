"""Multiple-choice video QA evaluation, MVBench style (``stllm eval mc``).

Input: a JSON list (or JSON lines) of ``{"video", "start"?, "end"?, "question", "options": [...], "answer",
"task"?}``; ``answer`` is the option's text, its letter ("B", "(B)") or its 0-based index.

Each question is answered two ways, both reported:
- ``generate``: the paper's protocol. Frames at 1 per second over the clip, clamped to 4-16, at segment
  midpoints; the prompt is ST-LLM's MVBench system text, ``Question: ...``, the lettered options and
  "Only give the best option."; the answer starts with ``Best option:(`` and is decoded greedily; correct
  when its first letter is the answer's.
- ``score``: the same prompt, then the likelihood of each option letter after ``Best option:(``; the most
  likely letter is the answer (no parsing, never an invalid answer).
A video that cannot be read fails its own item (``error``) and is left out of the accuracies.
"""

from __future__ import annotations

import json
import logging
import string
from collections import defaultdict
from pathlib import Path

from pydantic import BaseModel, Field

log = logging.getLogger("stllm.mc")

SYSTEM = (
    "Carefully watch the video and pay attention to the cause and sequence of events, the detail and "
    "movement of objects, and the action and pose of persons. Based on your observations, select the best "
    "option that accurately addresses the question.\n"
)
QUESTION_PROMPT = "\nOnly give the best option."
ANSWER_PREFIX = "Best option:("
MODES = ("generate", "score")


class MCQuestion(BaseModel):
    video: str
    question: str
    options: list[str] = Field(min_length=2, max_length=26)
    answer: str | int
    start: float | None = None
    end: float | None = None
    task: str = "all"

    def answer_index(self) -> int:
        """The correct option's 0-based index (the answer may be given as text, letter or index)."""
        a = self.answer
        if isinstance(a, int):
            if not 0 <= a < len(self.options):
                raise ValueError(f"answer index {a} is outside the {len(self.options)} options")
            return a
        if a in self.options:
            return self.options.index(a)
        letter = a.strip().strip("()").upper()
        if len(letter) == 1 and letter in string.ascii_uppercase[: len(self.options)]:
            return string.ascii_uppercase.index(letter)
        raise ValueError(f"answer {a!r} is neither an option, a letter nor an index")

    def prompt(self) -> str:
        options = "\n".join(f"({string.ascii_uppercase[i]}) {o}" for i, o in enumerate(self.options))
        return f"{SYSTEM}Question: {self.question}\nOptions:\n{options}{QUESTION_PROMPT}"


def load_questions(path: str | Path) -> list[MCQuestion]:
    text = Path(path).read_text()
    rows = (
        json.loads(text)
        if text.lstrip().startswith("[")
        else [json.loads(x) for x in text.splitlines() if x.strip()]
    )
    questions = [MCQuestion(**r) for r in rows]
    for q in questions:
        q.answer_index()  # a malformed answer is refused up front, with the question
    return questions


def clip_frames(q: MCQuestion, max_side: int | None = None):
    """The paper's sampling: 1 frame per second of the clip, at least 4 and at most 16, segment midpoints."""
    from workers.stllm.video import probe, read_frames, segment_times

    info = probe(q.video)
    start = max(0.0, q.start or 0.0)
    end = min(info.duration, q.end if q.end is not None else info.duration)
    n = min(16, max(4, round(end - start)))
    return read_frames(q.video, segment_times(start, end, n), max_side=max_side)


def _letter(text: str) -> str | None:
    for ch in text.strip():
        if ch.upper() in string.ascii_uppercase:
            return ch.upper()
    return None


def evaluate_mc(model, questions: list[MCQuestion], modes: tuple[str, ...] = MODES, progress=None) -> dict:
    """Accuracy per task and overall for each mode, and every item's answers. ``model`` is a loaded STLLM."""
    import torch

    items = []
    for q in questions:
        item = {
            "video": q.video,
            "task": q.task,
            "question": q.question,
            "answer": "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[q.answer_index()],
        }
        try:
            frames = clip_frames(q, max_side=2 * model.backbone.image_size)
            if hasattr(model.backbone, "instruction"):  # a question-aware Q-Former reads the question
                model.backbone.instruction = q.question
            with torch.inference_mode():
                video = model.video_tokens(model.frame_features(frames).unsqueeze(0))
                letters = list(string.ascii_uppercase[: len(q.options)])
                if "generate" in modes:
                    text = model.generate(video, q.prompt(), max_new_tokens=4, answer_prefix=ANSWER_PREFIX)[0]
                    item["generate"] = _letter(text)
                    item["generated"] = text
                if "score" in modes:
                    logp = model.score(video, [q.prompt()], letters, answer_prefix=ANSWER_PREFIX)[0, 0]
                    item["score"] = letters[int(logp.argmax())]
        except Exception as e:  # one unreadable video fails its own item
            log.warning("%s: %s", q.video, e)
            item["error"] = str(e)
        items.append(item)
        if progress:
            progress(item)
    return summarize(items, modes)


def summarize(items: list[dict], modes: tuple[str, ...] = MODES) -> dict:
    """Micro-averaged accuracy overall and per task for each mode (items with an error left out)."""
    out: dict = {"n": len(items), "errors": sum("error" in i for i in items), "items": items}
    for mode in modes:
        per_task: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for i in items:
            if "error" in i:
                continue
            per_task[i["task"]][0] += i.get(mode) == i["answer"]
            per_task[i["task"]][1] += 1
        right = sum(c for c, _ in per_task.values())
        total = sum(n for _, n in per_task.values())
        out[mode] = {
            "overall": right / total if total else float("nan"),
            "per_task": {t: c / n for t, (c, n) in sorted(per_task.items())},
        }
    return out


def line_video_questions(records: list[dict], seed: int = 0) -> list[dict]:
    """Multiple-choice questions from generated line videos' ground truth (``stllm generate``): which event
    happens first, and how many parts pass. Deterministic for a seed."""
    import random

    rng = random.Random(seed)
    out = []
    for r in records:
        segs = sorted(r["segments"], key=lambda s: s["start_s"])
        labels = list(dict.fromkeys(s["label"] for s in segs))
        if len(labels) >= 2:
            options = labels[:4]
            rng.shuffle(options)
            out.append(
                {
                    "video": r["video"],
                    "task": "event order",
                    "question": "Which event happens first in the video?",
                    "options": [o.replace("_", " ") for o in options],
                    "answer": labels[0].replace("_", " "),
                }
            )
        n = sum(s["label"] == "part_passing" for s in segs)
        counts = sorted({n, n + 1, max(0, n - 1), n + 2})
        rng.shuffle(counts)
        out.append(
            {
                "video": r["video"],
                "task": "counting",
                "question": "How many parts pass on the conveyor?",
                "options": [str(c) for c in counts],
                "answer": str(n),
            }
        )
    return out
