"""The Label Studio backend's settings, shared by the Flask app and the ``stllm labelstudio`` commands.

From the environment (``workers.settings``): STLLM_LS_* and LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY.

Where Label Studio is (its URL, and the API key this backend uses with it) comes from configuration. Only where
it is not configured does the backend keep what Label Studio sends with ``/setup`` (``<state>/connection.json``),
and only from a caller it can trust: one that passed basic auth, or, without basic auth, a Label Studio on this
machine calling from this machine. A learned URL is never used with a configured key, and a learned key only
with the configured URL's origin.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from workers.settings import current


def _ls():
    return current().labelstudio


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a URL, the host lower-cased and the port explicit: what "same server" compares."""
    p = urlsplit(url)
    port = p.port or {"http": 80, "https": 443}.get(p.scheme)
    return p.scheme, (p.hostname or "").lower(), port


def check_ls_url(url: object) -> str:
    """A Label Studio URL as ``/setup`` may give it: http(s), a host, no credentials, query or fragment.
    Returns it without a trailing slash; raises ValueError saying what is wrong."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError("the Label Studio URL must be a non-empty string")
    try:
        p = urlsplit(url.strip())
        p.port  # noqa: B018  (raises for a port that is not a number)
    except ValueError as e:
        raise ValueError(f"{url!r} is not a URL: {e}") from e
    if p.scheme not in ("http", "https"):
        raise ValueError(f"{url!r}: only http and https Label Studio URLs are used")
    if not p.hostname or p.username is not None or p.password is not None or p.query or p.fragment:
        raise ValueError(f"{url!r}: a Label Studio URL is scheme://host[:port][/path], nothing more")
    if any(c in url for c in "\\ \t\r\n"):
        raise ValueError(f"{url!r}: whitespace or backslashes in the URL")
    return url.strip().rstrip("/")


def is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class BackendSettings:
    state: Path = field(default_factory=lambda: _ls().state)
    document_root: str | None = field(default_factory=lambda: os.environ.get("LOCAL_FILES_DOCUMENT_ROOT"))
    auth_user: str | None = field(default_factory=lambda: _ls().auth_user)
    auth_password: str | None = field(default_factory=lambda: _ls().auth_password)
    # Label Studio's API, where workers push predictions and START_TRAINING pulls annotations.
    ls_url: str | None = field(default_factory=lambda: os.environ.get("LABEL_STUDIO_URL"))
    ls_api_key: str | None = field(default_factory=lambda: os.environ.get("LABEL_STUDIO_API_KEY"))
    # Start a fine-tune round after this many new corrections (0: only on START_TRAINING).
    round_every: int = field(default_factory=lambda: _ls().round_every)
    # Round settings (a RoundSettings as JSON), e.g. '{"train": {"steps": 200}}'.
    round_settings: dict = field(default_factory=lambda: dict(_ls().round_settings))
    # Hosts (besides Label Studio itself) whose http(s) media URLs workers may download.
    allowed_hosts: frozenset[str] = field(default_factory=lambda: _ls().allowed_hosts)
    # Whether queued jobs carry the API key through the broker (False: workers have LABEL_STUDIO_API_KEY).
    send_key: bool = field(default_factory=lambda: _ls().send_key)
    # The largest request body read, in bytes (larger: 413).
    max_body: int = field(default_factory=lambda: _ls().max_body)
    # /predict does not enqueue a task again within this many seconds of enqueueing it.
    requeue_after_s: float = 600.0

    def __post_init__(self) -> None:
        if bool(self.auth_user) != bool(self.auth_password):
            raise ValueError(
                "basic auth needs both STLLM_LS_BASIC_AUTH_USER and STLLM_LS_BASIC_AUTH_PASSWORD "
                "(one without the other would leave the backend open)"
            )

    def connection(self) -> tuple[str | None, str | None]:
        """(Label Studio URL, API key): the configured ones; a learned pair only where neither is configured;
        a learned key with the configured URL only when it was learned from that URL's origin."""
        if self.ls_api_key:  # a configured key goes to the configured URL only, never to a learned one
            return self.ls_url, self.ls_api_key
        learned = {}
        path = self.state / "connection.json"
        if path.is_file():
            learned = json.loads(path.read_text())
        if self.ls_url:
            same = learned.get("url") and origin(learned["url"]) == origin(self.ls_url)
            return self.ls_url, learned.get("api_key") if same else None
        return learned.get("url"), learned.get("api_key")

    def learn_connection(self, url: object, api_key: object, caller: str | None, authenticated: bool) -> str:
        """Keep the URL and key Label Studio sent with /setup (readable by this user only) where the policy
        in the module docstring allows it. Returns what happened, for the log: "configured", "learned",
        "unchanged", or why nothing was learned. Raises ValueError for a malformed URL or key."""
        if url is None and api_key is None:
            return "nothing sent"
        if self.ls_url and self.ls_api_key:
            return "configured"
        if self.ls_api_key:
            return "not learned: LABEL_STUDIO_API_KEY is set, so the URL must be configured too (LABEL_STUDIO_URL)"
        url = check_ls_url(url)
        if not isinstance(api_key, str) or not api_key.strip() or any(c.isspace() for c in api_key.strip()):
            raise ValueError("the access token must be a non-empty string without whitespace")
        if self.ls_url and origin(url) != origin(self.ls_url):
            return f"not learned: {url} is not the configured LABEL_STUDIO_URL"
        if not authenticated and not (is_loopback_host(urlsplit(url).hostname) and is_loopback_host(caller)):
            return (
                "not learned: the backend has no basic auth, so only a Label Studio on this machine may set "
                "where it is; set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, or STLLM_LS_BASIC_AUTH_*"
            )
        path = self.state / "connection.json"
        body = json.dumps({"url": url, "api_key": api_key.strip()})
        if path.is_file() and path.read_text() == body:
            return "unchanged"
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(body)
        tmp.chmod(0o600)
        tmp.replace(path)
        return "learned"
