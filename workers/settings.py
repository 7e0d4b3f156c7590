"""Every ``STLLM_*`` environment variable, read in this one place.

``current()`` reads the environment into a typed :class:`Settings`; the pool, the CLI and the front ends call it
where they start (a worker process, a command, the Flask app) and hand explicit values on. The engine
(``workers.stllm``) never reads the environment.

| variable | default | what it sets |
|---|---|---|
| STLLM_BROKER_URL | unset | the pool's broker, e.g. ``redis://host:6379/0``; unset: jobs run in the calling process |
| STLLM_RESULT_BACKEND | the broker URL | where task results and progress are kept |
| STLLM_ROUND_BROKER_URL | broker's Redis db + 1 | the broker of fine-tune rounds |
| STLLM_TASK_TIME_LIMIT | 3600 | hard limit of one pre-label/ask task, seconds (soft limit: 90% of it) |
| STLLM_ROUND_TIME_LIMIT | 86400 | hard limit of one round, seconds |
| STLLM_VISIBILITY_TIMEOUT | 2 x task limit | seconds before Redis redelivers an unacknowledged task |
| STLLM_ROUND_VISIBILITY_TIMEOUT | 2 x round limit | the same for rounds |
| STLLM_RESTORE_INTERVAL | 10 | seconds between sweeps for unacknowledged tasks |
| STLLM_MODEL | builtin | the model a worker serves when no model store is configured |
| STLLM_MODEL_STORE | ~/.stllm/models | the model store (versions, snapshots, registry) |
| STLLM_DEVICE | auto | a worker's device: cpu, cuda, cuda:1 |
| STLLM_DTYPE | auto | a worker's compute dtype: auto, fp32, bf16 |
| STLLM_WORKER_ROLE | unset | ``rounds`` for a worker that only runs rounds (loads no serving model at start) |
| STLLM_CACHE_DIR | ~/.cache/stllm | converted shipped weights (the builtin model's LM) |
| STLLM_MEDIA_CACHE | ~/.cache/stllm/media | downloaded remote videos |
| STLLM_KEEP_FREED_MEMORY | 1 | CPU workers: malloc keeps freed memory for reuse (0: leave malloc alone) |
| STLLM_FUSED_LINEAR | 1 | CPU serving: oneDNN fused linear layers and MLPs (0: off) |
| STLLM_EXACT_GELU | 1 | CPU serving: a tanh-form GELU computed as exact GELU inside fused kernels (0: keep tanh) |
| STLLM_CPU_KERNELS | 1 | CPU serving: AMX attention, one-pass RMSNorm and RoPE where the CPU has AMX (0: off) |
| STLLM_MAX_VIDEO_HOURS | 48 | a longer video (or one with a frame at an absurd timestamp) fails with that reason |
| STLLM_MAX_VIDEO_PIXELS | 67108864 | a video with larger frames (8192 x 8192) fails with that reason |
| STLLM_MEDIA_MAX_BYTES | 34359738368 | a larger download (32 GiB) fails, by Content-Length or as it arrives |
| STLLM_MEDIA_DEADLINE | 3600 | seconds a whole download may take |
| STLLM_MEDIA_CACHE_MAX | 107374182400 | the media cache's size bound (100 GiB); the least recently used files go first |
| STLLM_LS_STATE | .stllm/labelstudio | the Label Studio backend's prediction cache and corrections log |
| STLLM_LS_BASIC_AUTH_USER / _PASSWORD | unset | basic auth the backend requires (both or neither) |
| STLLM_LS_ROUND_EVERY | 0 | start a round after this many new corrections (0: only on START_TRAINING) |
| STLLM_LS_ROUND_SETTINGS | {} | a round's settings as JSON, e.g. ``{"train": {"steps": 200}}`` |
| STLLM_LS_ALLOWED_HOSTS | unset | hosts (``host`` or ``host:port``) besides Label Studio whose http(s) media workers may download |
| STLLM_LS_ALLOW_PRIVATE | unset | hosts on loopback / private / link-local addresses media downloads may reach (Label Studio's own is always allowed) |
| STLLM_LS_SEND_KEY | 0 | whether queued jobs carry the Label Studio API key through the broker (0: workers use their own) |
| STLLM_LS_MAX_BODY | 67108864 | the largest request body the backend reads, in bytes (larger: 413) |
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path


def _flag(name: str, default: bool = True) -> bool:
    return os.environ.get(name, "1" if default else "0") != "0"


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    try:
        return default if raw in (None, "") else int(raw)
    except ValueError as e:
        raise ValueError(f"{name} must be a whole number, got {raw!r}") from e


def _opt(name: str) -> str | None:
    return os.environ.get(name) or None


def _hosts(name: str) -> frozenset[str]:
    """A comma-separated host list, lower-cased (hosts compare case-insensitively)."""
    return frozenset(h.strip().lower() for h in os.environ.get(name, "").split(",") if h.strip())


@dataclass(frozen=True)
class CpuServingSettings:
    """Switches for serving on a CPU (see ``workers/stllm/cpu/README.md``)."""

    keep_freed_memory: bool = True
    fused_linear: bool = True
    exact_gelu: bool = True
    kernels: bool = True


@dataclass(frozen=True)
class LabelStudioSettings:
    state: Path = Path(".stllm/labelstudio")
    auth_user: str | None = None
    auth_password: str | None = None
    round_every: int = 0
    round_settings: dict = field(default_factory=dict)
    allowed_hosts: frozenset[str] = frozenset()
    allow_private: frozenset[str] = frozenset()
    send_key: bool = False
    max_body: int = 64 << 20


@dataclass(frozen=True)
class Settings:
    broker_url: str | None = None
    result_backend: str | None = None
    round_broker_url: str | None = None
    task_time_limit: int = 3600
    round_time_limit: int = 86400
    visibility_timeout: int | None = None
    round_visibility_timeout: int | None = None
    restore_interval: int = 10
    model: str = "builtin"
    model_store: Path | None = None
    device: str | None = None
    dtype: str = "auto"
    worker_role: str | None = None
    cache_dir: Path = Path.home() / ".cache" / "stllm"
    media_cache: Path = Path.home() / ".cache" / "stllm" / "media"
    media_max_bytes: int = 32 << 30
    media_deadline: float = 3600.0
    media_cache_max: int = 100 << 30
    max_video_hours: float = 48.0
    max_video_pixels: int = 8192 * 8192
    cpu: CpuServingSettings = field(default_factory=CpuServingSettings)
    labelstudio: LabelStudioSettings = field(default_factory=LabelStudioSettings)


def current() -> Settings:
    """The settings as the environment gives them now (read on every call: cheap, and tests may change it)."""
    cache = Path(os.environ.get("STLLM_CACHE_DIR") or Path.home() / ".cache" / "stllm")
    store = _opt("STLLM_MODEL_STORE")
    vis, round_vis = _opt("STLLM_VISIBILITY_TIMEOUT"), _opt("STLLM_ROUND_VISIBILITY_TIMEOUT")
    try:
        round_settings = json.loads(os.environ.get("STLLM_LS_ROUND_SETTINGS") or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"STLLM_LS_ROUND_SETTINGS is not JSON: {e}") from e
    return Settings(
        broker_url=_opt("STLLM_BROKER_URL"),
        result_backend=_opt("STLLM_RESULT_BACKEND"),
        round_broker_url=_opt("STLLM_ROUND_BROKER_URL"),
        task_time_limit=_int("STLLM_TASK_TIME_LIMIT", 3600),
        round_time_limit=_int("STLLM_ROUND_TIME_LIMIT", 86400),
        visibility_timeout=_int("STLLM_VISIBILITY_TIMEOUT", 0) if vis else None,
        round_visibility_timeout=_int("STLLM_ROUND_VISIBILITY_TIMEOUT", 0) if round_vis else None,
        restore_interval=_int("STLLM_RESTORE_INTERVAL", 10),
        model=os.environ.get("STLLM_MODEL") or "builtin",
        model_store=Path(store) if store else None,
        device=_opt("STLLM_DEVICE"),
        dtype=os.environ.get("STLLM_DTYPE") or "auto",
        worker_role=_opt("STLLM_WORKER_ROLE"),
        cache_dir=cache,
        media_cache=Path(os.environ.get("STLLM_MEDIA_CACHE") or cache / "media"),
        media_max_bytes=_int("STLLM_MEDIA_MAX_BYTES", 32 << 30),
        media_deadline=float(_int("STLLM_MEDIA_DEADLINE", 3600)),
        media_cache_max=_int("STLLM_MEDIA_CACHE_MAX", 100 << 30),
        max_video_hours=float(os.environ.get("STLLM_MAX_VIDEO_HOURS") or 48.0),
        max_video_pixels=_int("STLLM_MAX_VIDEO_PIXELS", 8192 * 8192),
        cpu=CpuServingSettings(
            keep_freed_memory=_flag("STLLM_KEEP_FREED_MEMORY"),
            fused_linear=_flag("STLLM_FUSED_LINEAR"),
            exact_gelu=_flag("STLLM_EXACT_GELU"),
            kernels=_flag("STLLM_CPU_KERNELS"),
        ),
        labelstudio=LabelStudioSettings(
            state=Path(os.environ.get("STLLM_LS_STATE") or ".stllm/labelstudio"),
            auth_user=_opt("STLLM_LS_BASIC_AUTH_USER"),
            auth_password=_opt("STLLM_LS_BASIC_AUTH_PASSWORD"),
            round_every=_int("STLLM_LS_ROUND_EVERY", 0),
            round_settings=round_settings,
            allowed_hosts=_hosts("STLLM_LS_ALLOWED_HOSTS"),
            allow_private=_hosts("STLLM_LS_ALLOW_PRIVATE"),
            send_key=_flag("STLLM_LS_SEND_KEY", default=False),
            max_body=_int("STLLM_LS_MAX_BODY", 64 << 20),
        ),
    )
