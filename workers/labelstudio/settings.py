"""The Label Studio backend's settings, shared by the Flask app and the ``stllm labelstudio`` commands.

From the environment (``workers.settings``): STLLM_LS_* and LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY.
Unset, the URL and key Label Studio sends with ``/setup`` are kept in ``<state>/connection.json`` and used.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from workers.settings import current


def _ls():
    return current().labelstudio


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
    # Whether queued jobs carry the API key (False: workers have LABEL_STUDIO_API_KEY themselves).
    send_key: bool = field(default_factory=lambda: _ls().send_key)
    # /predict does not enqueue a task again within this many seconds of enqueueing it.
    requeue_after_s: float = 600.0

    def connection(self) -> tuple[str | None, str | None]:
        """(Label Studio URL, API key): the configured ones, else those learned from /setup."""
        learned = {}
        path = self.state / "connection.json"
        if (not self.ls_url or not self.ls_api_key) and path.is_file():
            learned = json.loads(path.read_text())
        return self.ls_url or learned.get("url"), self.ls_api_key or learned.get("api_key")

    def learn_connection(self, url: str | None, api_key: str | None) -> None:
        """Keep the URL and key Label Studio sent with /setup (readable by this user only)."""
        if not url or not api_key or (self.ls_url and self.ls_api_key):
            return
        path = self.state / "connection.json"
        body = json.dumps({"url": url, "api_key": api_key})
        if path.is_file() and path.read_text() == body:
            return
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(body)
        tmp.chmod(0o600)
        tmp.replace(path)
