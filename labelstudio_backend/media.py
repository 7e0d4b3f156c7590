"""Where a Label Studio task's video is on disk. Local-files URLs resolve under the shared document root
only; anything that would escape it, and hosts that are not allowed, are refused with the reason."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit


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
    if parts.scheme in ("", "file") and not parts.netloc:
        raise MediaError(
            f"plain file paths are not served; use Local Storage (/data/local-files/?d=...): {url!r}"
        )
    raise MediaError(
        f"media at {parts.scheme}://{parts.netloc} is not fetched by this backend (only local files)"
    )
