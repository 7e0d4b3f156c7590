"""The front ends and the client stay light: importing them never imports torch or the engine."""

from __future__ import annotations

import subprocess
import sys


def test_front_ends_and_client_do_not_import_torch():
    code = (
        "import sys; import fiftyone_stllm, labelstudio_backend.app, workers.labelstudio.timeline, "
        "workers.pool.client, workers.sinks, workers.rounds.registry, workers.rounds.corrections; "
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'workers.stllm') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
