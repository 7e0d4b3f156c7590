"""Remote videos: an http(s) source is downloaded once into a local cache before decoding (in the decode
prefetch thread, so it overlaps compute). Label Studio's own URLs get its API key; no other host gets one.

Every download, and every redirect it follows (at most :data:`MAX_REDIRECTS`):
- goes to http or https only;
- carries credentials only to the origin they belong to: a redirect to another origin (Label Studio's
  ``/tasks/<id>/resolve/`` answers 303 to a presigned S3/GCS/Azure URL) drops the Authorization header;
- never reaches a loopback, private, link-local, multicast, reserved or cloud-metadata address, except Label
  Studio's own origin and the hosts in ``STLLM_LS_ALLOW_PRIVATE``;
- must deliver the whole body its Content-Length announces, or nothing is cached.

A download has a size cap (``STLLM_MEDIA_MAX_BYTES``) and a total deadline (``STLLM_MEDIA_DEADLINE``); the cache
(``STLLM_MEDIA_CACHE``, one file per URL) is bounded by ``STLLM_MEDIA_CACHE_MAX``, least recently used first.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import os
import socket
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from workers.labelstudio.media import host_allowed
from workers.labelstudio.rest import auth_header
from workers.labelstudio.settings import origin
from workers.settings import current
from workers.stllm.video import VideoError

MAX_REDIRECTS = 5
_keys: dict[tuple, str] = {}  # Label Studio origin (scheme, host, port) -> API key


def _origin(url: str) -> str:
    p = urlsplit(url)
    return f"{p.scheme}://{p.netloc}"


def register_key(url: str, api_key: str) -> None:
    """Use ``api_key`` for downloads from ``url``'s origin (a Label Studio server)."""
    _keys[origin(url)] = api_key


def is_remote(source: str) -> bool:
    return urlsplit(str(source)).scheme in ("http", "https")


def _key_for(url: str) -> str | None:
    env_url, env_key = os.environ.get("LABEL_STUDIO_URL"), os.environ.get("LABEL_STUDIO_API_KEY")
    if env_url and env_key and origin(env_url) == origin(url):
        return env_key
    return _keys.get(origin(url))


def _trusted(url: str) -> bool:
    """Label Studio's own origin (configured or registered with its key): it may live on a private network."""
    env_url = os.environ.get("LABEL_STUDIO_URL")
    return (env_url is not None and origin(env_url) == origin(url)) or origin(url) in _keys


def _forbidden_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or str(ip) == "169.254.169.254"  # cloud metadata (also link-local; named for the reader)
    )


def check_target(url: str) -> None:
    """Raise VideoError unless ``url`` may be downloaded (see the module docstring)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise VideoError(url, "only http(s) URLs with a host are downloaded")
    if _trusted(url) or host_allowed(url, current().labelstudio.allow_private):
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
    except OSError as e:
        raise VideoError(url, f"cannot resolve {parts.hostname}: {e}") from e
    bad = sorted({info[4][0] for info in infos if _forbidden_address(info[4][0])})
    if bad:
        raise VideoError(
            url,
            f"refused: {parts.hostname} is a loopback/private/link-local address ({', '.join(bad)}); "
            "add it to STLLM_LS_ALLOW_PRIVATE to allow it",
        )


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows at most MAX_REDIRECTS hops, each checked; credentials stay with their origin."""

    max_redirections = MAX_REDIRECTS

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        check_target(newurl)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and origin(newurl) != origin(req.full_url):
            new.remove_header("Authorization")
        return new


_opener = urllib.request.build_opener(_Redirects)


def bound_cache(cache: Path, max_bytes: int, keep: Path | None = None, min_age_s: float = 600.0) -> None:
    """Remove the least recently used downloads until the cache holds at most ``max_bytes``; never ``keep``
    (the file just fetched) nor a file used in the last ``min_age_s`` (a worker may be about to open it)."""
    now = time.time()
    files = []
    for p in cache.iterdir():
        try:
            st = p.stat()
        except OSError:
            continue
        if p.is_file() and ".part" not in p.name:
            files.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in files)
    for mtime, size, p in sorted(files, key=lambda x: x[0]):
        if total <= max_bytes:
            return
        if p == keep or now - mtime < min_age_s:
            continue
        p.unlink(missing_ok=True)
        total -= size


def fetch(source: str, timeout: float = 120.0) -> str:
    """A local path for ``source``: itself when local, else the cached download (made if missing).
    Raises VideoError naming the URL and the reason when the download fails or is refused."""
    if not is_remote(source):
        return source
    cache = current().media_cache
    suffix = Path(urlsplit(source).path).suffix[:8] or ".mp4"
    path = cache / (hashlib.sha1(source.encode()).hexdigest() + suffix)
    if path.exists():
        os.utime(path)  # recently used: the cache bound removes the least recently used first
        return str(path)
    check_target(source)
    limits = current()
    cache.mkdir(parents=True, exist_ok=True)
    headers = {}
    key = _key_for(source)
    if key:
        headers["Authorization"] = auth_header(_origin(source), key)
    tmp = path.with_name(path.name + f".part{os.getpid()}")
    try:
        started = time.monotonic()
        with _opener.open(urllib.request.Request(source, headers=headers), timeout=timeout) as r:
            expected = r.headers.get("Content-Length")
            cap = limits.media_max_bytes
            if expected is not None and expected.isdigit() and int(expected) > cap:
                raise VideoError(
                    source, f"is {int(expected):,} bytes: over the limit of {cap:,} (STLLM_MEDIA_MAX_BYTES)"
                )
            written = 0
            with open(tmp, "wb") as f:
                while chunk := r.read1(1 << 20):  # what has arrived: a slow sender cannot hold a read forever
                    written += len(chunk)
                    if written > cap:
                        raise VideoError(
                            source, f"more than {cap:,} bytes: over the limit (STLLM_MEDIA_MAX_BYTES)"
                        )
                    if time.monotonic() - started > limits.media_deadline:
                        raise VideoError(
                            source, f"took longer than {limits.media_deadline:g} s (STLLM_MEDIA_DEADLINE)"
                        )
                    f.write(chunk)
            if expected is not None and expected.isdigit() and written != int(expected):
                raise VideoError(source, f"download incomplete: {written} of {expected} bytes")
        tmp.replace(path)
        bound_cache(cache, limits.media_cache_max, keep=path)
    except (OSError, http.client.HTTPException) as e:  # URLError and HTTPError are OSErrors
        raise VideoError(source, f"download failed: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)  # a failed or refused download leaves nothing behind
    return str(path)
