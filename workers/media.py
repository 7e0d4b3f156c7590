"""Remote videos: an http(s) source is downloaded once into a local cache before decoding (in the decode
prefetch thread, so it overlaps compute). Label Studio's own URLs get its API key; no other host gets one.

Cache: ``STLLM_MEDIA_CACHE`` (``workers.settings``), one file per URL.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from workers.labelstudio.rest import auth_header
from workers.settings import current
from workers.stllm.video import VideoError

_keys: dict[str, str] = {}  # Label Studio origin -> API key


def _origin(url: str) -> str:
    p = urlsplit(url)
    return f"{p.scheme}://{p.netloc}"


def register_key(url: str, api_key: str) -> None:
    """Use ``api_key`` for downloads from ``url``'s origin (a Label Studio server)."""
    _keys[_origin(url)] = api_key


def is_remote(source: str) -> bool:
    return urlsplit(str(source)).scheme in ("http", "https")


def _key_for(url: str) -> str | None:
    origin = _origin(url)
    env_url = os.environ.get("LABEL_STUDIO_URL")
    if (
        origin not in _keys
        and env_url
        and _origin(env_url) == origin
        and os.environ.get("LABEL_STUDIO_API_KEY")
    ):
        return os.environ["LABEL_STUDIO_API_KEY"]
    return _keys.get(origin)


def fetch(source: str, timeout: float = 120.0) -> str:
    """A local path for ``source``: itself when local, else the cached download (made if missing).
    Raises VideoError naming the URL and the reason when the download fails."""
    if not is_remote(source):
        return source
    cache = current().media_cache
    suffix = Path(urlsplit(source).path).suffix[:8] or ".mp4"
    path = cache / (hashlib.sha1(source.encode()).hexdigest() + suffix)
    if path.exists():
        return str(path)
    cache.mkdir(parents=True, exist_ok=True)
    headers = {}
    key = _key_for(source)
    if key:
        headers["Authorization"] = auth_header(_origin(source), key)
    tmp = path.with_name(path.name + f".part{os.getpid()}")
    try:
        with urllib.request.urlopen(urllib.request.Request(source, headers=headers), timeout=timeout) as r:
            with open(tmp, "wb") as f:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
        tmp.replace(path)
    except OSError as e:  # URLError and HTTPError are OSErrors
        tmp.unlink(missing_ok=True)
        raise VideoError(source, f"download failed: {e}") from e
    return str(path)
