"""The two things users ask of the model, as plain functions over a loaded model.

``prelabel_videos``: videos + an event vocabulary -> per-label segments with scores.
``ask_videos``: videos + a question -> an answer, P(yes) for yes/no questions, and the best-matching moment.

Each video is decoded once (the frames of every window plus the global frames, by seeking), encoded
once by the frozen vision encoder, and every window is one ST-LLM input: its own frames at full tokens
(local) + the whole video's pooled tokens (global). All labels are scored side by side after one shared
video prefix, windows in batches. The next video is decoded in a background thread while this one computes.
A video that fails yields a result with ``error`` set; the others go on.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from workers.events import segments_from_probabilities, window_cores, windows
from workers.media import fetch
from workers.review import video_uncertainty
from workers.schemas import (
    AskResult,
    AskSettings,
    EventLabel,
    Moment,
    PrelabelResult,
    PrelabelSettings,
    Segment,
    VideoMeta,
    is_yes_no_question,
)
from workers.settings import current
from workers.stllm.model import STLLM, WindowFeatures
from workers.stllm.video import VideoError, VideoInfo, VideoLimits, probe, read_frames, segment_times
from workers.timecodes import seconds_to_frames

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


@dataclass
class DecodedVideo:
    """Frames of one video, sampled for windowed inference."""

    info: VideoInfo
    spans: list[tuple[float, float]]  # windows, seconds
    frames: torch.Tensor  # uint8 (N, H, W, 3): all distinct sampled frames
    window_index: torch.Tensor  # (W, F) indices into frames
    global_index: torch.Tensor  # (G,) indices into frames


def decode_windows(
    path: str,
    window_s: float,
    stride_s: float,
    per_window: int,
    n_global: int,
    max_side: int,
    info: VideoInfo | None = None,
    part: slice | None = None,
) -> DecodedVideo:
    """Probe ``path`` (unless ``info`` is given) and decode, once each, the frames of every window (segment
    midpoints) and ``n_global`` frames over the whole video, downscaled to ``max_side``. ``part``: only
    these windows (``spans`` is then that slice of the video's windows). Raises VideoError."""
    info = info or probe(path, video_limits())
    spans = windows(info.duration, window_s, stride_s)
    if part is not None:
        spans = spans[part]
    wanted = [segment_times(a, b, per_window) for a, b in spans]
    global_times = segment_times(0.0, info.duration, n_global) if n_global else []

    # Frames are identified by number, so windows that share a frame decode it once.
    def frame_no(t: float) -> int:
        return min(int(t * info.fps), info.n_frames - 1)

    numbers = sorted({frame_no(t) for ts in wanted for t in ts} | {frame_no(t) for t in global_times})
    where = {n: i for i, n in enumerate(numbers)}
    frames = read_frames(path, [(n + 0.5) / info.fps for n in numbers], max_side=max_side)
    return DecodedVideo(
        info=info,
        spans=spans,
        frames=frames,
        window_index=torch.tensor([[where[frame_no(t)] for t in ts] for ts in wanted], dtype=torch.long).view(
            len(wanted), per_window
        ),
        global_index=torch.tensor([where[frame_no(t)] for t in global_times], dtype=torch.long),
    )


# A video whose windows would hold more decoded frames than this is streamed: its windows are decoded,
# encoded and scored this many frames at a time, keeping only the global frames' features, so a shift-long
# recording takes the memory of a short one.
MAX_FRAMES_IN_MEMORY = 512


@dataclass
class LongVideo:
    """A video to be streamed (see :data:`MAX_FRAMES_IN_MEMORY`): its probe and its windows."""

    path: str
    info: VideoInfo
    spans: list[tuple[float, float]]


def plan_video(path: str, window_s: float, stride_s: float, per_window: int, n_global: int, max_side: int):
    """A short video decoded (a DecodedVideo), or a long one to stream (a LongVideo)."""
    info = probe(path, video_limits())
    spans = windows(info.duration, window_s, stride_s)
    if len(spans) * per_window + n_global > MAX_FRAMES_IN_MEMORY:
        return LongVideo(path, info, spans)
    return decode_windows(path, window_s, stride_s, per_window, n_global, max_side, info=info)


@torch.inference_mode()
def stream_probabilities(
    model: STLLM,
    video: LongVideo,
    questions: Sequence[str],
    window_s: float,
    stride_s: float,
    per_window: int,
    n_global: int,
    batch: int,
    max_frames: int | None = None,
) -> tuple[np.ndarray, torch.Tensor | None]:
    """P(yes) of each question in each window of a long video, (W, Q), its windows decoded, encoded and
    scored ``max_frames`` (default :data:`MAX_FRAMES_IN_MEMORY`) frames at a time: the same probabilities as the whole video at once, in bounded
    memory. Also returns the global frames' features (G, K, Dv) (None without global frames)."""
    side = decode_side(model)
    glob = None
    if n_global:
        g = decode_windows(
            video.path, window_s, stride_s, per_window, n_global, side, video.info, part=slice(0, 0)
        )
        glob = model.clip_features(g.frames, g.global_index[None])[0]
    per_part = max(1, (max_frames or MAX_FRAMES_IN_MEMORY) // per_window)
    out = []
    for a in range(0, len(video.spans), per_part):
        d = decode_windows(
            video.path, window_s, stride_s, per_window, 0, side, video.info, part=slice(a, a + per_part)
        )
        local = model.clip_features(d.frames, d.window_index)
        features = WindowFeatures(local, glob if glob is not None else local.new_zeros((0, *local.shape[2:])))
        out.append(window_probabilities(model, d, questions, batch, features=features))
        del d, local, features
    return np.concatenate(out), glob


def video_limits() -> VideoLimits:
    """The limits jobs hold videos to (STLLM_MAX_VIDEO_HOURS, STLLM_MAX_VIDEO_PIXELS)."""
    s = current()
    return VideoLimits(max_hours=s.max_video_hours, max_pixels=s.max_video_pixels)


_END = object()


def _lower_thread_priority() -> None:
    """Give the calling thread the lowest CPU priority (on Linux each thread has its own nice value)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # no per-thread priority here: the thread runs at normal priority
        pass


def prefetch(
    items: Iterable[T], fn: Callable[[T], R], low_priority: bool = False
) -> Iterator[tuple[T, R | Exception]]:
    """Yield (item, fn(item)) in order, computing the next item's fn in a background thread meanwhile.
    An exception from fn is yielded in place of its result. ``items`` is read lazily, one item ahead of
    what has been yielded, so a generator can stop the run early (a cancelled job).

    ``low_priority`` runs the thread at the lowest CPU priority, for a model computing on the same CPU: there
    the thread's decoding would take cores from the model (measured slower than no prefetch on 2 cores);
    at low priority it uses only the cycles the model leaves idle, and still overlaps downloads."""

    def safe(item: T) -> R | Exception:
        try:
            return fn(item)
        except Exception as e:  # handed to the caller, which records it for this item alone
            return e

    it = iter(items)
    item = next(it, _END)
    with ThreadPoolExecutor(
        max_workers=1, initializer=_lower_thread_priority if low_priority else None
    ) as pool:
        pending = pool.submit(safe, item) if item is not _END else None
        while pending is not None:
            result = pending.result()
            following = next(it, _END)
            pending = pool.submit(safe, following) if following is not _END else None
            yield item, result
            item = following


def _meta(info: VideoInfo) -> VideoMeta:
    return VideoMeta(
        fps=info.fps,
        n_frames=info.n_frames,
        duration=info.duration,
        variable_frame_rate=info.variable_frame_rate,
    )


def _error_text(e: Exception) -> str:
    return str(e) if isinstance(e, VideoError) else f"{e.__class__.__name__}: {e}"


def decode_side(model: STLLM) -> int:
    """Longest side frames are decoded at: about twice the encoder's input, enough for its resize and crop
    and far cheaper than converting full-HD frames."""
    return 2 * model.backbone.image_size


@torch.inference_mode()
def window_probabilities(
    model: STLLM,
    decoded: DecodedVideo,
    questions: Sequence[str],
    batch: int,
    features: WindowFeatures | None = None,
) -> np.ndarray:
    """P(yes) of each question in each window: (W, Q). Yes/no are normalised against each other.
    ``features``: the video's encoder features where the caller has them already (not encoded again)."""
    return window_probabilities_many(model, [decoded], questions, batch, [features])[0]


def encode_video(model: STLLM, decoded: DecodedVideo) -> WindowFeatures:
    """The encoder features of a decoded video's windows and global frames."""
    return model.window_features(decoded.frames, decoded.window_index, decoded.global_index)


@torch.inference_mode()
def window_probabilities_many(
    model: STLLM,
    decoded: Sequence[DecodedVideo | None],
    questions: Sequence[str],
    batch: int,
    features: Sequence[WindowFeatures | None] | None = None,
) -> list[np.ndarray]:
    """:func:`window_probabilities` for several videos, their windows scored together: the LLM sees batches
    of ``batch`` windows across video boundaries, so short videos still fill a GPU's batch. One (W, Q) array
    per video, in order. A video whose encoder ``features`` are given needs no decoded frames (None)."""
    features = list(features) if features is not None else [None] * len(decoded)
    features = [
        f if f is not None else encode_video(model, d) for d, f in zip(decoded, features, strict=True)
    ]
    tokens = []
    for f in features:
        g = f.global_frames.unsqueeze(0) if len(f.global_frames) else None
        for i in range(0, len(f.windows), batch):
            local = f.windows[i : i + batch]  # (b, F, K, Dv)
            tokens.append(
                model.video_tokens(local, g.expand(len(local), -1, -1, -1) if g is not None else None)
            )
    if len({t.shape[1:] for t in tokens}) > 1:  # videos with different token counts: score each on its own
        return [
            window_probabilities_many(model, [d], questions, batch, [f])[0]
            for d, f in zip(decoded, features, strict=True)
        ]
    video = torch.cat(tokens)
    out = []
    for i in range(0, len(video), batch):
        logp = model.score(video[i : i + batch], list(questions), ["yes", "no"])  # (b, Q, 2)
        out.append(logp.softmax(-1)[..., 0])
    probs = torch.cat(out).numpy()
    bounds = np.cumsum([0] + [len(f.windows) for f in features])
    return [probs[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def prelabel_videos(
    model: STLLM,
    videos: Iterable[str],
    labels: Sequence[EventLabel],
    settings: PrelabelSettings | None = None,
    progress: Callable[[PrelabelResult], None] | None = None,
) -> list[PrelabelResult]:
    """Pre-label events on each video. One result per video, in order; a failed video has ``error`` set.

    Consecutive videos are scored together until they fill ``settings.window_batch`` windows (see
    :func:`window_probabilities_many`); if such a group fails, its videos are retried one by one, so a bad
    video still fails alone. ``progress`` is called with each result as soon as it is ready (for progress
    bars and sinks).
    """
    s = (settings or PrelabelSettings()).resolved(model.prelabel_defaults)
    questions = [label.question() for label in labels]
    results: list[PrelabelResult] = []

    def decode(path: str) -> DecodedVideo | LongVideo:
        return plan_video(
            fetch(path), s.window_s, s.stride_s, s.frames_per_window, s.global_frames, decode_side(model)
        )

    def emit(result: PrelabelResult) -> None:
        results.append(result)
        if progress:
            progress(result)

    def failed(path: str, e: Exception) -> PrelabelResult:
        """One bad video fails alone, with the file and the reason."""
        log.warning("pre-label failed for %s: %s", path, _error_text(e))
        return PrelabelResult(video=str(path), model_version=model.version, error=_error_text(e))

    def finish(path: str, decoded: DecodedVideo | LongVideo, probs: np.ndarray) -> PrelabelResult:
        try:
            return _prelabel_result(model, path, decoded.info, decoded.spans, probs, labels, s)
        except Exception as e:
            return failed(path, e)

    group: list[tuple[str, DecodedVideo]] = []

    def flush() -> None:
        try:
            all_probs = window_probabilities_many(model, [d for _, d in group], questions, s.window_batch)
        except Exception:
            all_probs = None  # retried one by one below
        for k, (path, decoded) in enumerate(group):
            if all_probs is not None:
                emit(finish(path, decoded, all_probs[k]))
                continue
            try:
                emit(finish(path, decoded, window_probabilities(model, decoded, questions, s.window_batch)))
            except Exception as e:
                emit(failed(path, e))
        group.clear()

    for path, decoded in prefetch(videos, decode, low_priority=model.device.type == "cpu"):
        if isinstance(decoded, Exception):
            flush()  # results stay in the order of the videos
            emit(failed(path, decoded))
            continue
        if isinstance(decoded, LongVideo):
            flush()
            try:
                probs, _ = stream_probabilities(
                    model,
                    decoded,
                    questions,
                    s.window_s,
                    s.stride_s,
                    s.frames_per_window,
                    s.global_frames,
                    s.window_batch,
                )
                emit(finish(path, decoded, probs))
            except Exception as e:
                emit(failed(path, e))
            continue
        group.append((path, decoded))
        if sum(len(d.window_index) for _, d in group) >= s.window_batch:
            flush()
    flush()
    return results


def _prelabel_result(
    model: STLLM,
    path: str,
    info: VideoInfo,
    spans: list[tuple[float, float]],
    probs: np.ndarray,
    labels: Sequence[EventLabel],
    s: PrelabelSettings,
) -> PrelabelResult:
    """Windows' probabilities -> per-label segments, as one video's result."""
    result = PrelabelResult(
        video=str(path),
        model_version=model.version,
        meta=_meta(info),
        windows=spans,
        window_probs={
            label.name: [round(float(p), 5) for p in probs[:, j]] for j, label in enumerate(labels)
        },
    )
    result.segments = result_segments(result, [label.name for label in labels], s)
    result.uncertainty, result.label_uncertainty = video_uncertainty(result.window_probs, s.high_for)
    return result


def result_segments(result: PrelabelResult, labels: Sequence[str], s: PrelabelSettings) -> list[Segment]:
    """A result's segments from its window probabilities under settings ``s`` (resolved): what pre-labeling
    returns, and what a round uses to try thresholds without scoring the windows again."""
    meta, spans = result.meta, [tuple(w) for w in result.windows]
    cores = window_cores(spans, s.stride_s, meta.duration)
    centres = [(a + b) / 2 for a, b in spans] if s.refine_edges else None
    segments: list[Segment] = []
    for label in labels:
        segments += segments_from_probabilities(
            label,
            cores,
            result.window_probs[label],
            meta.fps,
            meta.n_frames,
            high=s.high_for(label),
            low=s.low_for(label),
            smoothing=s.smoothing,
            min_duration=s.min_duration_s,
            centres=centres,
        )
    return segments


def _yes_no_form(question: str) -> str:
    if is_yes_no_question(question):
        return question
    return f"Is this clip relevant to the question '{question}'? Answer yes or no."


def ask_videos(
    model: STLLM,
    videos: Iterable[str],
    question: str,
    settings: AskSettings | None = None,
    progress: Callable[[AskResult], None] | None = None,
) -> list[AskResult]:
    """Answer ``question`` over each video: free text (greedy), P(yes) for yes/no questions, and the window
    that best matches it (highest P(yes) of the question, or of 'is this clip relevant to it')."""
    if not question or not question.strip():
        raise ValueError("the question is empty")
    s = settings or AskSettings()
    probe_question = _yes_no_form(question)
    results = []

    n_global = max(s.global_frames, s.frames)

    def decode(path: str) -> DecodedVideo | LongVideo:
        return plan_video(
            fetch(path), s.window_s, s.stride_s, s.frames_per_window, n_global, decode_side(model)
        )

    for path, decoded in prefetch(videos, decode, low_priority=model.device.type == "cpu"):
        try:
            if isinstance(decoded, Exception):
                raise decoded
            info = decoded.info
            if isinstance(decoded, LongVideo):  # streamed: bounded memory however long the video
                probs, all_frames = stream_probabilities(
                    model,
                    decoded,
                    [probe_question],
                    s.window_s,
                    s.stride_s,
                    s.frames_per_window,
                    n_global,
                    32,
                )
            else:
                features = encode_video(model, decoded)
                all_frames = features.global_frames  # (G, K, Dv), uniform over the video
                probs = window_probabilities(model, decoded, [probe_question], batch=32, features=features)
            probs = probs[:, 0]
            g = len(all_frames)
            seg = g / s.frames
            local_idx = [min(g - 1, int(seg / 2 + round(seg * i))) for i in range(s.frames)]  # ST-LLM's pick
            with torch.inference_mode():
                whole = model.video_tokens(all_frames[local_idx].unsqueeze(0), all_frames.unsqueeze(0))
            answer = model.generate(whole, question, max_new_tokens=s.max_new_tokens)[0]
            p_yes = None
            if is_yes_no_question(question):
                p_yes = float(model.score(whole, [question], ["yes", "no"]).softmax(-1)[0, 0, 0])
            best = int(np.argmax(probs))
            start, end = decoded.spans[best]
            first, last = seconds_to_frames(start, end, info.fps, info.n_frames)
            result = AskResult(
                video=str(path),
                question=question,
                model_version=model.version,
                answer=answer,
                p_yes=p_yes,
                moment=Moment(
                    start_s=start, end_s=end, first_frame=first, last_frame=last, score=float(probs[best])
                ),
                meta=_meta(info),
            )
        except Exception as e:
            log.warning("ask failed for %s: %s", path, _error_text(e))
            result = AskResult(
                video=str(path), question=question, model_version=model.version, error=_error_text(e)
            )
        results.append(result)
        if progress:
            progress(result)
    return results
