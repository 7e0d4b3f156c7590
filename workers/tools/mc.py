"""Multiple-choice video QA evaluation, MVBench style (``stllm eval mc``), as the original's
``stllm/test/mvbench`` runs it.

Input: a JSON list (or JSON lines) of ``{"video", "start"?, "end"?, "question", "options" (or MVBench's
"candidates"), "answer", "task"?}``; ``answer`` is the option's text, its letter ("B", "(B)") or its 0-based
index. Or a downloaded MVBench: its ``json/`` folder of per-task files (:func:`load_mvbench`), videos under
``video/`` beside it, frame-folder tasks (Episodic Reasoning: ``00001.jpg``... at 3 fps) read directly.

Each question is answered two ways, both reported:
- ``generate``: the paper's protocol. Frames as the original's ``get_index`` picks them (one per second of
  the clip, floored, clamped to 4-16, at segment midpoints); for an ST-LLM release the prompt is the
  original's to the character (below) and the Q-Former reads ``Question: ...\nOptions:\n(A) ...``; the answer
  starts with ``Best option:(`` and is decoded greedily; correct when its first letter is the answer's.
- ``score``: the same prompt, then the likelihood of each option letter after ``Best option:(``, each letter
  spelled as it follows ``(`` in context; the most likely letter is the answer (never an invalid answer).

The original's prompt (``mvbench_conversation.get_prompt2`` with its system text also in the question,
``--system_llm``'s default) for an ST-LLM release, its bos being ``</s>``::

    </s>{system}###Human: <Video>[video tokens]</Video>\n###Human: {system}{question}\nOnly give the best option.
    \n###Assistant: Best option:(

Other backbones get the same text in their own chat format. An item whose video cannot be read is listed with
its error and counts as wrong in the headline accuracy, as the paper's run would have had it (``readable``
gives the accuracy over the items that could be read).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import string
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, Field

log = logging.getLogger("stllm.mc")

SYSTEM = (
    "Carefully watch the video and pay attention to the cause and sequence of events, the detail and "
    "movement of objects, and the action and pose of persons. Based on your observations, select the best "
    "option that accurately addresses the question.\n"
)
QUESTION_PROMPT = "\nOnly give the best option."
ANSWER_PREFIX = "Best option:("
MODES = ("generate", "score")
FRAME_FOLDER_FPS = 3.0  # MVBench's frame-folder task (TVQA frames) was extracted at 3 fps

# MVBench's tasks as the original lists them: (json file, video folder under the video root, kind, bounded)
MVBENCH_TASKS = {
    "Action Sequence": ("action_sequence.json", "star/Charades_v1_480", "video", True),
    "Action Prediction": ("action_prediction.json", "star/Charades_v1_480", "video", True),
    "Action Antonym": ("action_antonym.json", "ssv2_video", "video", False),
    "Fine-grained Action": ("fine_grained_action.json", "Moments_in_Time_Raw/videos", "video", False),
    "Unexpected Action": ("unexpected_action.json", "FunQA_test/test", "video", False),
    "Object Existence": ("object_existence.json", "clevrer/video_validation", "video", False),
    "Object Interaction": ("object_interaction.json", "star/Charades_v1_480", "video", True),
    "Object Shuffle": ("object_shuffle.json", "perception/videos", "video", False),
    "Moving Direction": ("moving_direction.json", "clevrer/video_validation", "video", False),
    "Action Localization": ("action_localization.json", "sta/sta_video", "video", True),
    "Scene Transition": ("scene_transition.json", "scene_qa/video", "video", False),
    "Action Count": ("action_count.json", "perception/videos", "video", False),
    "Moving Count": ("moving_count.json", "clevrer/video_validation", "video", False),
    "Moving Attribute": ("moving_attribute.json", "clevrer/video_validation", "video", False),
    "State Change": ("state_change.json", "perception/videos", "video", False),
    "Fine-grained Pose": ("fine_grained_pose.json", "nturgbd", "video", False),
    "Character Order": ("character_order.json", "perception/videos", "video", False),
    "Egocentric Navigation": ("egocentric_navigation.json", "vlnqa", "video", False),
    "Episodic Reasoning": ("episodic_reasoning.json", "tvqa/frames_fps3_hq", "frames", True),
    "Counterfactual Inference": ("counterfactual_inference.json", "clevrer/video_validation", "video", False),
}


class MCQuestion(BaseModel):
    video: str
    question: str
    options: list[str] = Field(
        min_length=2, max_length=26, validation_alias=AliasChoices("options", "candidates")
    )
    answer: str | int
    start: float | None = None
    end: float | None = None
    task: str = "all"
    kind: Literal["video", "frames"] = "video"  # "frames": a folder of 00001.jpg... at 3 fps

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

    def qa_text(self) -> str:
        """The original's ``qa_template``: ``Question: ...\nOptions:\n(A) ...`` (what its Q-Former reads)."""
        text = f"Question: {self.question}\nOptions:\n"
        text += "".join(f"({string.ascii_uppercase[i]}) {o}\n" for i, o in enumerate(self.options))
        return text.rstrip()

    def prompt(self) -> str:
        """What the LLM reads after the video: the system text, the question and options, the instruction."""
        return f"{SYSTEM}{self.qa_text()}{QUESTION_PROMPT}"


def load_questions(path: str | Path, video_root: str | Path | None = None) -> list[MCQuestion]:
    """Questions from a JSON list / JSON lines file, or from a downloaded MVBench's ``json/`` folder (see
    :func:`load_mvbench`). A malformed answer is refused up front, naming the question."""
    path = Path(path)
    if path.is_dir():
        return load_mvbench(path, video_root)
    text = path.read_text()
    rows = (
        json.loads(text)
        if text.lstrip().startswith("[")
        else [json.loads(x) for x in text.splitlines() if x.strip()]
    )
    return _checked([MCQuestion(**r) for r in rows])


def _checked(questions: list[MCQuestion]) -> list[MCQuestion]:
    for q in questions:
        try:
            q.answer_index()
        except ValueError as e:
            raise ValueError(f"{q.video}: {q.question!r}: {e}") from None
    return questions


def load_mvbench(json_dir: str | Path, video_root: str | Path | None = None) -> list[MCQuestion]:
    """A downloaded MVBench: each task file of :data:`MVBENCH_TASKS` found in ``json_dir`` (entries
    ``{video, question, candidates, answer, start?, end?}``), its videos under ``video_root`` (default: the
    ``video`` folder beside ``json_dir``) in the task's folder. Bounded tasks read only [start, end]."""
    json_dir = Path(json_dir)
    root = Path(video_root) if video_root else json_dir.parent / "video"
    questions = []
    found = [(task, spec) for task, spec in MVBENCH_TASKS.items() if (json_dir / spec[0]).is_file()]
    if not found:
        raise ValueError(
            f"no MVBench task file in {json_dir} (expected e.g. {MVBENCH_TASKS['Action Count'][0]})"
        )
    for task, (file, folder, kind, bounded) in found:
        for row in json.loads((json_dir / file).read_text()):
            questions.append(
                MCQuestion(
                    video=str(root / folder / row["video"]),
                    question=row["question"],
                    options=row["candidates"],
                    answer=row["answer"],
                    start=row.get("start") if bounded else None,
                    end=row.get("end") if bounded else None,
                    task=task,
                    kind=kind,
                )
            )
    return _checked(questions)


def frame_indices(
    start: float | None, end: float | None, fps: float, max_frame: int, first: int = 0
) -> list[int]:
    """The original's ``get_index`` with its frame count from the clip's length: one frame per second,
    floored, clamped to 4-16, at the middle of equal segments of [start, end] (the whole video without a
    bound). ``max_frame``: the last frame's index (decoded frames - 1; a frame folder's file count)."""
    bounded = start is not None and end is not None
    start_idx = max(first, round(start * fps)) if bounded else first
    end_idx = min(round(end * fps), max_frame) if bounded else max_frame
    length = (end - start) if bounded else max_frame / fps
    n = 4 if length < 4 else 16 if length > 16 else math.floor(length)
    seg = (end_idx - start_idx) / n
    return [int(start_idx + seg / 2 + round(seg * i)) for i in range(n)]


def clip_frames(q: MCQuestion, max_side: int | None = None):
    """The question's frames, uint8 (T, H, W, 3), picked by :func:`frame_indices`."""
    import numpy as np
    import torch

    if q.kind == "frames":
        from PIL import Image

        folder = Path(q.video)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such frame folder")
        count = len([f for f in folder.iterdir() if f.is_file()])
        images = []
        for i in frame_indices(q.start, q.end, FRAME_FOLDER_FPS, count, first=1):
            with Image.open(folder / f"{i:05d}.jpg") as im:
                im = im.convert("RGB")
                if max_side and max(im.size) > max_side:
                    im.thumbnail((max_side, max_side))
                images.append(np.asarray(im))
        if len({i.shape for i in images}) > 1:
            raise ValueError(f"{folder}: frames of different sizes")
        return torch.from_numpy(np.stack(images))
    from workers.stllm.video import probe, read_frames

    info = probe(q.video)
    numbers = frame_indices(q.start, q.end, info.fps, info.n_frames - 1)
    return read_frames(q.video, [(n + 0.5) / info.fps for n in numbers], max_side=max_side)


def _letter(text: str) -> str | None:
    for ch in text.strip():
        if ch.upper() in string.ascii_uppercase:
            return ch.upper()
    return None


def _is_stllm_release(model) -> bool:
    return hasattr(model.backbone, "qformer_tokenizer")


@contextlib.contextmanager
def original_prompt(model) -> Iterator[None]:
    """The original MVBench prompt around the video for an ST-LLM release (see the module docstring); other
    backbones keep their own chat format."""
    if not _is_stllm_release(model):
        yield
        return
    saved = model.prompt_head, model.prompt_mid, model.prompt_tail
    model.prompt_head = f"</s>{SYSTEM}###Human: <Video>"
    model.prompt_mid, model.prompt_tail = "</Video>\n###Human: ", "\n###Assistant: "
    try:
        yield
    finally:
        model.prompt_head, model.prompt_mid, model.prompt_tail = saved


def evaluate_mc(model, questions: list[MCQuestion], modes: tuple[str, ...] = MODES, progress=None) -> dict:
    """Accuracy per task and overall for each mode, and every item's answers. ``model`` is a loaded STLLM."""
    import torch

    items = []
    with original_prompt(model):
        for q in questions:
            item = {
                "video": q.video,
                "task": q.task,
                "question": q.question,
                "answer": string.ascii_uppercase[q.answer_index()],
            }
            try:
                frames = clip_frames(q, max_side=2 * model.backbone.image_size)
                with torch.inference_mode():
                    # the Q-Former (a release's) reads the question with its options, as the original's does
                    video = model.video_tokens(model.frame_features(frames).unsqueeze(0), text=q.qa_text())
                    letters = list(string.ascii_uppercase[: len(q.options)])
                    if "generate" in modes:
                        text = model.generate(
                            video, q.prompt(), max_new_tokens=4, answer_prefix=ANSWER_PREFIX
                        )[0]
                        item["generate"] = _letter(text)
                        item["generated"] = text
                    if "score" in modes:
                        logp = model.score(
                            video, [q.prompt()], letters, answer_prefix=ANSWER_PREFIX, in_context=True
                        )[0, 0]
                        item["score"] = letters[int(logp.argmax())]
            except Exception as e:  # one unreadable video fails its own item
                log.warning("%s: %s", q.video, e)
                item["error"] = f"{e.__class__.__name__}: {e}"
            items.append(item)
            if progress:
                progress(item)
    return summarize(items, modes)


def summarize(items: list[dict], modes: tuple[str, ...] = MODES) -> dict:
    """Micro-averaged accuracy overall and per task for each mode. An item that failed counts as wrong
    (``overall``, ``per_task``); ``readable`` is the accuracy over the items that did not fail. The failed
    items are listed under ``failed``."""
    out: dict = {
        "n": len(items),
        "errors": sum("error" in i for i in items),
        "failed": [
            {"video": i["video"], "task": i["task"], "error": i["error"]} for i in items if "error" in i
        ],
        "items": items,
    }
    for mode in modes:
        per_task: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for i in items:
            per_task[i["task"]][0] += "error" not in i and i.get(mode) == i["answer"]
            per_task[i["task"]][1] += 1
        right = sum(c for c, _ in per_task.values())
        readable = len(items) - out["errors"]
        out[mode] = {
            "overall": right / len(items) if items else float("nan"),
            "readable": right / readable if readable else float("nan"),
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
