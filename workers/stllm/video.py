"""Video input: probe a file, sample frames over a whole video or a window, preprocess them in torch.

Everything that can go wrong with a file raises :class:`VideoError`, which names the file and the reason,
so a caller can fail that one video and carry on with the rest of a batch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

# Gaps between wanted frames above this are crossed by seeking; below it, decoding on is cheaper.
SEEK_THRESHOLD_S = 1.0


class VideoError(ValueError):
    """A video could not be used. ``path`` names the file, ``reason`` says why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read video {self.path!r}: {reason}")


@dataclass(frozen=True)
class VideoInfo:
    """What a video file holds. ``n_frames`` counts decodable frames; times are seconds."""

    path: str
    fps: float
    n_frames: int
    duration: float
    width: int
    height: int
    variable_frame_rate: bool


# FFmpeg opens local files only, with the demuxers of video containers: a file whose bytes are a playlist
# (HLS, concat, image sequences...) or an SDP description is refused instead of fetching what it names.
VIDEO_DEMUXERS = (
    "mov,mp4,m4a,3gp,3g2,mj2",  # MP4 / QuickTime family (one demuxer, these names)
    "matroska,webm",
    "avi",
    "mpegts",
    "mpeg",
    "flv",
    "ogg",
    "asf",
    "gif",
    "mjpeg",
    "h264",
    "hevc",
    "m4v",
    "yuv4mpegpipe",
)
OPEN_OPTIONS = {"protocol_whitelist": "file", "format_whitelist": ",".join(VIDEO_DEMUXERS)}


def _open(path: str | os.PathLike) -> av.container.InputContainer:
    p = Path(path)
    if not p.exists():
        raise VideoError(path, "no such file")
    if p.is_dir():
        raise VideoError(path, "is a directory, not a video file")
    if not os.access(p, os.R_OK):
        raise VideoError(path, "permission denied")
    try:
        container = av.open(str(p), options=OPEN_OPTIONS)
    except av.error.FFmpegError as e:  # corrupt header, unknown or refused container, truncated file
        raise VideoError(
            path, f"not a readable video container of an allowed format ({e.__class__.__name__}: {e})"
        ) from e
    if not container.streams.video:
        container.close()
        raise VideoError(path, "has no video stream")
    return container


@dataclass(frozen=True)
class VideoLimits:
    """What a video may be before it is refused (an error naming the file, not an out-of-memory kill). Jobs
    take them from STLLM_MAX_VIDEO_HOURS / STLLM_MAX_VIDEO_PIXELS (``workers.settings``)."""

    max_hours: float = 48.0  # a two-day recording; a packet at an absurd timestamp is far beyond
    max_pixels: int = 8192 * 8192  # 8K and beyond decode frames of hundreds of MB each


def probe(path: str | os.PathLike, limits: VideoLimits | None = None) -> VideoInfo:
    """Read a video's frame rate, frame count, duration and size, and detect a variable frame rate.

    The frame count is the frames that decode: every packet is demuxed (no decoding), so the count is right
    where the container's header is missing or wrong, and the last keyframe's group is decoded, so packets at
    the end that decode to nothing (a container can say more than it decodes) are not counted. The duration
    is that of the decoded frames; every frame-number conversion (windows, Label Studio ranges) uses this one
    length. A frame rate is variable when packet durations differ by more than 10% from the median.
    """
    container = _open(path)
    try:
        stream = container.streams.video[0]
        tb = float(stream.time_base)
        pts: list[int] = []
        last_key = None
        try:
            for packet in container.demux(stream):
                if packet.size and packet.pts is not None:
                    pts.append(packet.pts)
                    if packet.is_keyframe:
                        last_key = packet.pts
        except av.error.FFmpegError as e:
            raise VideoError(path, f"corrupt stream ({e})") from e
        if not pts:
            raise VideoError(path, "has zero frames")
        pts.sort()
        silent = _undecodable_tail(container, stream, last_key, pts)
        if silent >= len(pts):
            raise VideoError(path, "has zero frames that decode")
        pts_arr = np.asarray(pts[: len(pts) - silent], dtype=np.float64) * tb
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if len(pts_arr) > 1:
            deltas = np.diff(pts_arr)
            median = float(np.median(deltas))
            vfr = bool(median > 0 and np.any(np.abs(deltas - median) > 0.1 * median))
            fps = float(rate) if rate else 1.0 / median
            duration = float(pts_arr[-1] - pts_arr[0]) + (median if median > 0 else 1.0 / fps)
        else:
            vfr = False
            fps = float(rate) if rate else 1.0
            duration = 1.0 / fps
        if not math.isfinite(fps) or fps <= 0:
            raise VideoError(path, f"has an invalid frame rate {fps!r}")
        limits = limits or VideoLimits()
        if duration > limits.max_hours * 3600:
            raise VideoError(
                path,
                f"lasts {duration / 3600:.1f} h (a frame at {pts_arr[-1]:.0f} s): over the limit of "
                f"{limits.max_hours:g} h",
            )
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > limits.max_pixels:
            raise VideoError(
                path,
                f"is {width}x{height}: over the limit of {limits.max_pixels:,} pixels a frame",
            )
        return VideoInfo(
            path=str(path),
            fps=fps,
            n_frames=len(pts_arr),
            duration=round(duration, 6),
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            variable_frame_rate=vfr,
        )
    finally:
        container.close()


def _undecodable_tail(container, stream, last_key: int | None, pts: list[int]) -> int:
    """How many packets from the last keyframe on decode to no frame (0 where that cannot be checked). Costs
    one group of pictures, whatever the video's length."""
    if last_key is None:
        return 0
    tail = sum(p >= last_key for p in pts)
    decoded = 0
    try:
        container.seek(last_key, stream=stream, backward=True, any_frame=False)
        for packet in container.demux(stream):
            if packet.pts is not None and packet.pts < last_key and packet.size:
                continue
            try:
                decoded += sum(f.pts is None or f.pts >= last_key for f in packet.decode())
            except av.error.FFmpegError:  # a packet that does not decode: not a frame
                continue
    except av.error.FFmpegError:  # not seekable: keep the packet count
        return 0
    return max(0, tail - decoded)


def segment_times(
    start: float, end: float, n: int, mode: str = "middle", generator: torch.Generator | None = None
) -> list[float]:
    """Times of ``n`` frames over [start, end): the window is cut into ``n`` equal segments and one time is
    taken per segment, its midpoint (``mode="middle"``, for inference) or a random point (``"random"``,
    for training, as ST-LLM samples)."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if end <= start:
        raise ValueError(f"empty window [{start}, {end})")
    seg = (end - start) / n
    if mode == "middle":
        offsets = torch.full((n,), 0.5)
    elif mode == "random":
        offsets = torch.rand(n, generator=generator)
    else:
        raise ValueError(f"mode must be 'middle' or 'random', got {mode!r}")
    return [start + seg * (i + float(o)) for i, o in enumerate(offsets)]


def read_frames(
    path: str | os.PathLike,
    times: list[float],
    max_side: int | None = None,
    seek_threshold_s: float = SEEK_THRESHOLD_S,
) -> torch.Tensor:
    """Decode the frames shown at ``times`` (seconds, any order) as uint8 (T, H, W, 3) RGB.

    Seeks to a keyframe when the next wanted time is more than ``seek_threshold_s`` ahead, and decodes
    forward otherwise, so sparse samples from a long video cost a few GOPs each rather than the whole file.
    ``max_side`` downscales while converting (cheap, in FFmpeg) so the longer side is at most that.
    """
    if not times:
        raise ValueError("no frame times given")
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        tb = float(stream.time_base)
        start_pts = stream.start_time or 0
        w, h = stream.codec_context.width, stream.codec_context.height
        if max_side and max(w, h) > max_side:
            scale = max_side / max(w, h)
            w, h = max(2, round(w * scale)), max(2, round(h * scale))
        order = sorted(range(len(times)), key=lambda i: times[i])
        out: list[np.ndarray | None] = [None] * len(times)
        decoded = None  # iterator of (time, frame) since the last seek
        prev = ahead = None  # last frame at or before the target time; the first one after it
        last_t = -math.inf
        try:
            for i in order:
                t = max(0.0, times[i])
                if decoded is None or t - last_t > seek_threshold_s:
                    container.seek(int(start_pts + t / tb), stream=stream, backward=True, any_frame=False)
                    decoded = (
                        ((f.pts - start_pts) * tb if f.pts is not None else 0.0, f)
                        for f in container.decode(stream)
                    )
                    prev = ahead = None
                while True:  # the frame on screen at t: the last one starting at or before t
                    if ahead is None:
                        ahead = next(decoded, None)
                    if ahead is None or ahead[0] > t + 1e-6:
                        break
                    prev, ahead = ahead, None
                chosen = prev or ahead  # a seek may land just after t: take the first frame then
                if chosen is None:
                    raise VideoError(path, f"no frame could be decoded at {t:.3f}s")
                out[i] = chosen[1].to_ndarray(format="rgb24", width=w, height=h)
                last_t = t
        except av.error.FFmpegError as e:
            raise VideoError(path, f"corrupt stream ({e})") from e
        return torch.from_numpy(np.stack(out))
    finally:
        container.close()


def preprocess_frames(
    frames: torch.Tensor,
    size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    train: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> normalised float (T, 3, size, size), on the frames' device.

    Inference resizes the whole frame to ``size`` x ``size``: an event anywhere in the picture reaches the
    encoder. (A centre crop of the shorter side, ST-LLM's evaluation transform, cuts 22% off each side of a
    16:9 frame: the second event set's lamp, a disc in a corner, was never seen and its window ROC-AUC stayed
    at 0.5; bench/README.md.) Training takes one random resized crop (scale 0.5-1, the same for all frames of
    a clip) as ST-LLM does.
    """
    x = frames.permute(0, 3, 1, 2).float().div_(255.0)  # (T, 3, H, W)
    _, _, h, w = x.shape
    if train:
        area = h * w * float(torch.empty(1).uniform_(0.5, 1.0, generator=generator))
        side = int(min(h, w, math.sqrt(area)))
        top = int(torch.randint(0, h - side + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - side + 1, (1,), generator=generator))
        x = x[:, :, top : top + side, left : left + side]
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    else:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s
