"""Where a Label Studio task's video is. Local-files URLs resolve under the shared document root only
(anything that would escape it is refused); uploads are fetched from Label Studio with its API key, cloud
storage URIs (s3://, gs://, azure-blob://) through Label Studio's resolver for the task; other hosts only
when allowed by configuration (``STLLM_LS_ALLOWED_HOSTS``). The workers download remote media
(``workers.media``), never the backend inside a request."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from workers.labelstudio.settings import origin


class MediaError(ValueError):
    """A task's media URL that this backend will not or cannot open."""


def resolve_local(url: str, document_root: str | os.PathLike | None) -> Path:
    """``/data/local-files/?d=<relative path>`` (or an absolute ``http(s)://host/data/local-files/?d=...``)
    -> a path under ``document_root``."""
    if not url:
        raise MediaError("the task has no video URL")
    parts = urlsplit(url)
    if parts.path.rstrip("/").endswith("/data/local-files"):
        if document_root is None:
            raise MediaError("local-files URL but no LOCAL_FILES_DOCUMENT_ROOT is configured")
        rel = parse_qs(parts.query).get("d", [""])[0]
        if not rel:
            raise MediaError(f"local-files URL without a 'd' parameter: {url!r}")
        root = Path(document_root).resolve()
        path = (root / unquote(rel)).resolve()
        if root != path and root not in path.parents:
            raise MediaError(f"{url!r} points outside the document root")
        return path
    raise MediaError(f"{url!r} is not a local-files URL (/data/local-files/?d=...)")


CLOUD_SCHEMES = ("s3", "gs", "azure-blob")


def media_source(
    url: str,
    task_id: int,
    document_root: str | os.PathLike | None,
    ls_url: str | None = None,
    allowed_hosts: frozenset[str] = frozenset(),
) -> str:
    """What a worker opens for this task's video: a local path (local files), or an http(s) URL it downloads
    (Label Studio uploads and cloud storage go through ``ls_url``; other hosts only if allowed)."""
    parts = urlsplit(url or "")
    if parts.path.rstrip("/").endswith("/data/local-files") or not url:
        return str(resolve_local(url, document_root))
    if parts.scheme in CLOUD_SCHEMES:
        if not ls_url:
            raise MediaError(
                f"{url!r} is in cloud storage: set LABEL_STUDIO_URL so Label Studio can resolve it"
            )
        uri = base64.urlsafe_b64encode(url.encode()).decode()
        return f"{ls_url.rstrip('/')}/tasks/{task_id}/resolve/?fileuri={quote(uri)}"
    if parts.path.startswith("/data/upload/") and (not parts.netloc or _same_origin(url, ls_url)):
        if not ls_url:
            raise MediaError(f"{url!r} is a Label Studio upload: set LABEL_STUDIO_URL to fetch it")
        return f"{ls_url.rstrip('/')}{upload_path(parts.path)}"
    if parts.scheme in ("http", "https") and host_allowed(url, allowed_hosts):
        return url
    if parts.scheme in ("", "file") and not parts.netloc:
        raise MediaError(
            f"plain file paths are not served; use Local Storage (/data/local-files/?d=...): {url!r}"
        )
    raise MediaError(
        f"media at {parts.scheme}://{parts.netloc} is not fetched: add the host to STLLM_LS_ALLOWED_HOSTS "
        "or serve the file through Label Studio"
    )


UPLOAD = re.compile(r"/data/upload/\d+/[^/\\]+")


def upload_path(path: str) -> str:
    """An upload's path as Label Studio serves it, ``/data/upload/<project>/<file>``, the only path fetched
    with the API key: ``..``, encoded slashes or backslashes, deeper paths and other API paths are refused."""
    decoded = unquote(path)
    name = decoded.rsplit("/", 1)[-1]
    if not UPLOAD.fullmatch(decoded) or name in (".", "..") or unquote(decoded) != decoded:
        raise MediaError(f"{path!r} is not a Label Studio upload path (/data/upload/<project>/<file>)")
    return path


def host_allowed(url: str, allowed_hosts: frozenset[str]) -> bool:
    """Whether ``url``'s host is allowed: an entry ``host`` allows any port, ``host:port`` that port only;
    host names compare case-insensitively, the port explicit (80/443 by scheme)."""
    scheme, host, port = origin(url)
    allowed = {h.lower() for h in allowed_hosts}
    return bool(host) and (host in allowed or f"{host}:{port}" in allowed)


def _same_origin(a: str, b: str | None) -> bool:
    return bool(b) and origin(a) == origin(b)
