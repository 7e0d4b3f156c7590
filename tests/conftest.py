"""Shared fixtures: tiny random models built from configs (no downloads) and generated videos."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")

import pytest  # noqa: E402
from helpers import Redis, Worker, free_port  # noqa: E402

# One broker address for the session, set before anything imports workers.pool.app (Celery reads it once).
# Tests of the embedded default remove it with monkeypatch; pool tests start redis-server on it.
os.environ["STLLM_BROKER_URL"] = f"redis://127.0.0.1:{free_port()}/0"
os.environ["STLLM_VISIBILITY_TIMEOUT"] = "6"
os.environ["STLLM_RESTORE_INTERVAL"] = "1"


@pytest.fixture(scope="session")
def tiny_spec(tmp_path_factory):
    from workers.stllm.testing import tiny_composed

    return tiny_composed(tmp_path_factory.mktemp("tiny-composed"))


@pytest.fixture()
def tiny_model(tiny_spec):
    import torch

    from workers.stllm.io import build_model

    torch.manual_seed(0)
    return build_model(tiny_spec, device="cpu", dtype="fp32").eval()


@pytest.fixture(scope="session")
def model_dir(tiny_spec, tmp_path_factory) -> str:
    """A saved tiny model directory, version 'tiny@base' (what --model and STLLM_MODEL take)."""
    import torch

    from workers.stllm.io import build_model, save_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny"
    save_model(build_model(tiny_spec, device="cpu"), path, version="tiny@base")
    return str(path)


@pytest.fixture(scope="session")
def fiftyone(tmp_path_factory):
    """FiftyOne on its own MongoDB (the bundled mongod, data in a temp folder), with this project's plugin
    installed in a temp plugins folder the way `stllm fiftyone install` does it."""
    from workers.cli.fiftyone import install_fiftyone_plugin

    plugins = tmp_path_factory.mktemp("fo-plugins")
    os.environ["FIFTYONE_DATABASE_DIR"] = str(tmp_path_factory.mktemp("fo-db"))
    os.environ["FIFTYONE_PLUGINS_DIR"] = str(plugins)
    os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
    install_fiftyone_plugin(plugins)
    import fiftyone as fo

    return fo


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = Redis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def workers_factory(redis_server, model_dir, tmp_path):
    started: list[Worker] = []

    def start(name: str, queues: str = "ask,prelabel", **env) -> Worker:
        w = Worker(name, model_dir, tmp_path / f"{name}.log", {k: str(v) for k, v in env.items()}, queues)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()
