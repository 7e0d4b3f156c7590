"""Small helpers shared by tests that start servers."""

from __future__ import annotations

import json
import time
import urllib.request


def get_health(port: int, timeout_s: float, why: str = "") -> dict:
    """GET http://127.0.0.1:<port>/health until it answers (or fail after ``timeout_s``); returns its JSON."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                return json.load(r)
        except OSError:
            assert time.monotonic() < deadline, f"nothing answered on port {port}\n{why}"
            time.sleep(0.3)
