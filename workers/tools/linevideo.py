"""Synthetic factory-line videos with ground-truth events, written with PyAV.

A grey conveyor belt with moving stripes runs left to right; parts (squares, circles, triangles in a few
colours) enter, cross and leave. Events, each a ground-truth :class:`~workers.events.Segment`:

    part_passing   a part is on the belt
    jam            the belt stops: parts and stripes freeze
    defect         a defective part is visible (red, or a cracked shape)
    empty_line     no part on the belt
    hand           a hand/tool enters the frame from the top

Everything follows from ``seed``: the same parameters give the same frames and the same events.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import numpy as np

from workers.schemas import Segment

EVENTS = ("part_passing", "jam", "defect", "empty_line", "hand")
EVENT_DESCRIPTIONS = {
    "part_passing": "a part is moving along the conveyor",
    "jam": "the conveyor has stopped and parts are not moving",
    "defect": "a defective part: red coloured or cracked",
    "empty_line": "the conveyor is empty, no part on it",
    "hand": "a hand or tool reaches into the frame",
}
GOOD_COLOURS = [(40, 110, 220), (40, 180, 80), (230, 200, 40), (200, 200, 210)]
DEFECT_COLOUR = (220, 30, 30)


@dataclass
class LineVideoSpec:
    seed: int = 0
    duration: float = 20.0
    fps: float = 10.0
    width: int = 160
    height: int = 120


@dataclass
class _Part:
    enter: float  # time its centre crosses x=0
    speed: float  # px/s while the belt runs
    shape: str
    colour: tuple[int, int, int]
    defective: bool


def _plan(spec: LineVideoSpec, rng: np.random.Generator):
    """Parts, jams and hand intrusions over the video (all times in seconds)."""
    d = spec.duration
    speed = spec.width / rng.uniform(2.5, 4.0)  # a part takes 2.5-4 s to cross
    parts: list[_Part] = []
    t = rng.uniform(0.0, 2.0)
    while t < d:
        defective = rng.random() < 0.3
        shape = str(rng.choice(["square", "circle", "triangle"]))
        colour = (
            DEFECT_COLOUR
            if defective and rng.random() < 0.6
            else GOOD_COLOURS[rng.integers(len(GOOD_COLOURS))]
        )
        parts.append(_Part(t, speed, shape, colour, defective))
        # gaps sometimes long enough to leave the line empty
        t += rng.uniform(1.0, 3.0) if rng.random() < 0.7 else rng.uniform(4.0, 7.0)
    jams = []
    for _ in range(rng.integers(0, 2 + int(d // 30))):
        s = rng.uniform(0.1 * d, 0.9 * d)
        jams.append((s, min(d, s + rng.uniform(2.0, 4.0))))
    jams.sort()
    merged: list[tuple[float, float]] = []
    for s, e in jams:
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(e, merged[-1][1]))
        else:
            merged.append((s, e))
    hands = []
    for _ in range(rng.integers(0, 2 + int(d // 40))):
        s = rng.uniform(0.0, d - 2.0)
        hands.append((s, s + rng.uniform(1.5, 3.0)))
    return parts, merged, hands


def _belt_time(t: float, jams: list[tuple[float, float]]) -> float:
    """How long the belt has been running by time t (it stands still during jams)."""
    stopped = sum(max(0.0, min(t, e) - s) for s, e in jams if s < t)
    return t - stopped


def _part_x(part: _Part, t: float, jams, width: int) -> float | None:
    if t < part.enter:
        return None
    x = -10 + part.speed * (_belt_time(t, jams) - _belt_time(part.enter, jams))
    return x if x < width + 10 else None


def _draw_part(img: np.ndarray, part: _Part, x: float, y: int, size: int) -> None:
    h, w, _ = img.shape
    yy, xx = np.ogrid[:h, :w]
    if part.shape == "square":
        m = (np.abs(xx - x) <= size) & (np.abs(yy - y) <= size)
    elif part.shape == "circle":
        m = (xx - x) ** 2 + (yy - y) ** 2 <= size**2
    else:
        m = (yy - y <= size) & (yy - y >= -size) & (np.abs(xx - x) <= (yy - y + size) / 2)
    img[m] = part.colour
    if part.defective:  # a dark crack across the part
        crack = m & (np.abs((xx - x) - (yy - y)) <= 1)
        img[crack] = (20, 20, 20)


def render_frame(spec: LineVideoSpec, plan, t: float) -> np.ndarray:
    parts, jams, hands = plan
    w, h = spec.width, spec.height
    img = np.full((h, w, 3), (70, 75, 70), dtype=np.uint8)  # floor
    top, bottom = int(h * 0.35), int(h * 0.75)
    img[top:bottom] = (110, 110, 115)  # belt
    offset = int(_belt_time(t, jams) * parts[0].speed if parts else 0) % 20
    for x in range(-offset, w, 20):  # belt stripes show the belt moving or standing
        img[top:bottom, max(0, x) : max(0, x + 3)] = (90, 90, 95)
    size = max(4, int(h * 0.1))
    for part in parts:
        x = _part_x(part, t, jams, w)
        if x is not None:
            _draw_part(img, part, x, (top + bottom) // 2, size)
    for s, e in hands:
        if s <= t < e:  # an arm reaching down, then back
            phase = (t - s) / (e - s)
            reach = int(h * 0.6 * math.sin(math.pi * phase))
            cx = int(w * 0.5)
            img[: max(1, reach), cx - size // 2 : cx + size // 2] = (225, 180, 150)
    return img


def _runs(
    mask: np.ndarray, times: np.ndarray, label: str, spec: LineVideoSpec, n_frames: int
) -> list[Segment]:
    out = []
    i = 0
    dt = 1.0 / spec.fps
    while i < len(mask):
        if mask[i]:
            j = i
            while j + 1 < len(mask) and mask[j + 1]:
                j += 1
            out.append(
                Segment(
                    label=label,
                    start_s=round(float(times[i]), 4),
                    end_s=round(float(times[j] + dt), 4),
                    first_frame=i + 1,
                    last_frame=j + 1,
                )
            )
            i = j + 1
        else:
            i += 1
    return out


def ground_truth(spec: LineVideoSpec, plan) -> list[Segment]:
    """Per-frame states of every event, turned into segments (1-based frames, exact)."""
    parts, jams, hands = plan
    n = int(round(spec.duration * spec.fps))
    times = np.arange(n) / spec.fps
    on_belt = np.zeros(n, bool)
    defect = np.zeros(n, bool)
    jam = np.zeros(n, bool)
    hand = np.zeros(n, bool)
    size = max(4, int(spec.height * 0.1))
    for k, t in enumerate(times):
        for part in parts:
            x = _part_x(part, t, jams, spec.width)
            if x is not None and -size < x < spec.width + size:
                on_belt[k] = True
                defect[k] |= part.defective
        jam[k] = any(s <= t < e for s, e in jams)
        hand[k] = any(s <= t < e for s, e in hands)
    moving = on_belt & ~jam
    segs = []
    for label, mask in (
        ("part_passing", moving),
        ("jam", jam),
        ("defect", defect),
        ("empty_line", ~on_belt),
        ("hand", hand),
    ):
        segs += _runs(mask, times, label, spec, n)
    return segs


def write_mp4(path: str | Path, fps: float, width: int, height: int, frames: Iterable[np.ndarray]) -> None:
    """Encode RGB frames (H, W, 3 uint8) as an h264 mp4 at ``path`` (its folder created)."""
    from fractions import Fraction

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "23", "g": str(max(1, int(fps * 2)))}
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def write_line_video(path: str | Path, spec: LineVideoSpec) -> list[Segment]:
    """Write one h264 mp4 line video to ``path``; return its ground-truth segments."""
    rng = np.random.default_rng(spec.seed)
    plan = _plan(spec, rng)
    n = int(round(spec.duration * spec.fps))
    frames = (render_frame(spec, plan, k / spec.fps) for k in range(n))
    write_mp4(path, spec.fps, spec.width, spec.height, frames)
    return ground_truth(spec, plan)


def generate_dataset(
    directory: str | Path,
    n_videos: int,
    seed: int = 0,
    duration: float | tuple[float, float] = 20.0,
    fps: float = 10.0,
    width: int = 160,
    height: int = 120,
    progress: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Write ``n_videos`` videos (seeds ``seed..seed+n-1``) and ``ground_truth.jsonl`` into ``directory``.

    ``duration`` is seconds, or a (min, max) range drawn per video. Returns one record per video:
    {"video": path, "seed", "duration", "fps", "n_frames", "segments": [...]}.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n_videos):
        d = float(rng.uniform(*duration)) if isinstance(duration, tuple) else float(duration)
        spec = LineVideoSpec(seed=seed + i, duration=round(d, 1), fps=fps, width=width, height=height)
        path = directory / f"line_{seed + i:05d}.mp4"
        records.append(video_record(path, spec, write_line_video(path, spec)))
        if progress:
            progress(records[-1])
    save_ground_truth(directory, records)
    return records


def video_record(path: Path, spec, segments: list[Segment]) -> dict:
    """One generated video's line of ``ground_truth.jsonl``: its path, its spec (a dataclass with
    ``duration`` and ``fps``), its frame count and its segments."""
    return {
        "video": str(path),
        **asdict(spec),
        "n_frames": int(round(spec.duration * spec.fps)),
        "segments": [s.model_dump() for s in segments],
    }


def save_ground_truth(directory: Path, records: list[dict]) -> None:
    with open(directory / "ground_truth.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def load_ground_truth(path: str | Path) -> list[dict]:
    """Read a ``ground_truth.jsonl`` written by :func:`generate_dataset`."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
