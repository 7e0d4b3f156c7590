"""Label Studio figures on this machine, against a real Label Studio server (.venv-ls, `make test` installs
it), the backend under gunicorn, Redis and one CPU worker:

- /setup and /webhook latency p50/p95 (what Label Studio waits for; it allows the webhook 1 s);
- from importing N videos into a project to predictions from every task visible in Label Studio.

    .venv/bin/python bench/labelstudio.py [--model builtin] [--videos 10] [--duration 30]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CONFIG = """<View><Video name="video" value="$video" frameRate="10"/>
<TimelineLabels name="events" toName="video">
<Label value="jam" hint="the conveyor stops with parts piled up"/><Label value="hand"/><Label value="defect"/>
<Label value="part_passing"/><Label value="empty_line"/></TimelineLabels></View>"""
TOKEN = "stllm-bench-token-0123456789"


def post(url: str, body: dict, auth: str) -> float:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": auth},
    )
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()
    return time.perf_counter() - t


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return 1000 * xs[min(len(xs) - 1, int(q * len(xs)))]


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--videos", type=int, default=10)
    ap.add_argument("--duration", type=float, default=30.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="stllm-ls-"))
    from workers.pool.processes import free_port, start_redis, worker_commands
    from workers.pool.processes import wait_for_health as get_health
    from workers.tools.linevideo import generate_dataset

    media = work / "media"
    generate_dataset(media / "line", args.videos, seed=900, duration=args.duration)
    redis, broker = start_redis(work / "redis")
    env = {**os.environ, "STLLM_BROKER_URL": broker, "STLLM_MODEL": args.model}
    procs = []
    try:
        ls_port, port = free_port(), free_port()
        ls_env = {
            **env,
            "LABEL_STUDIO_BASE_DATA_DIR": str(work / "ls"),
            "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false",
            "LOCAL_FILES_SERVING_ENABLED": "true",
            "LOCAL_FILES_DOCUMENT_ROOT": str(media),
            "LATEST_VERSION_CHECK": "false",
        }
        procs.append(
            start(
                [".venv-ls/bin/label-studio", "start", "--no-browser", "--port", str(ls_port)]
                + ["--username", "b@example.com", "--password", "bench-secret-1", "--user-token", TOKEN]
                + ["--enable-legacy-api-token", "--data-dir", str(work / "ls")],
                ls_env,
                work / "ls.log",
            )
        )
        backend_env = {
            **env,
            "STLLM_LS_STATE": str(work / "backend"),
            "LOCAL_FILES_DOCUMENT_ROOT": str(media),
            "LABEL_STUDIO_URL": f"http://127.0.0.1:{ls_port}",
            "LABEL_STUDIO_API_KEY": TOKEN,
            "STLLM_LS_BASIC_AUTH_USER": "ls",
            "STLLM_LS_BASIC_AUTH_PASSWORD": "pw",
        }
        procs.append(
            start(
                [sys.executable, "-m", "workers.cli", "labelstudio", "serve", "--port", str(port)],
                backend_env,
                work / "backend.log",
            )
        )
        ((cmd, wenv),) = worker_commands([], "ask,prelabel", name="lsb")
        procs.append(
            start(cmd + ["--without-gossip", "--without-mingle"], {**env, **wenv}, work / "worker.log")
        )
        get_health(port, 60)
        auth = "Basic " + base64.b64encode(b"ls:pw").decode()
        url = f"http://127.0.0.1:{port}"

        setup = [post(f"{url}/setup", {"project": "1.1", "schema": CONFIG}, auth) for _ in range(200)]
        hook = []
        for i in range(1000):
            ann = {
                "id": 10_000 + i,
                "task": 1,
                "updated_at": f"2026-11-27T10:00:{i % 60:02d}Z",
                "result": [
                    {
                        "from_name": "events",
                        "to_name": "video",
                        "type": "timelinelabels",
                        "value": {"ranges": [{"start": 1, "end": 20}], "timelinelabels": ["jam"]},
                    }
                ],
            }
            body = {
                "action": "ANNOTATION_CREATED",
                "project": {"id": 99},
                "task": {"id": 1},
                "annotation": ann,
            }
            hook.append(post(f"{url}/webhook", body, auth))
        print(
            f"/setup: p50 {pct(setup, 0.5):.1f} ms, p95 {pct(setup, 0.95):.1f} ms; "
            f"/webhook ANNOTATION_CREATED (log growing to 1000 corrections): p50 {pct(hook, 0.5):.1f} ms, "
            f"p95 {pct(hook, 0.95):.1f} ms  (gunicorn, 2 workers x 4 threads, basic auth)"
        )

        from workers.labelstudio.rest import LabelStudioAPI

        api = LabelStudioAPI(f"http://127.0.0.1:{ls_port}", TOKEN)
        deadline = time.monotonic() + 300
        while True:
            try:
                api.client.projects.list()
                break
            except Exception:
                assert time.monotonic() < deadline, (work / "ls.log").read_text()[-2000:]
                time.sleep(1)
        while "serves" not in (work / "worker.log").read_text():
            time.sleep(0.5)
        ls = api.client
        project = ls.projects.create(title="bench", label_config=CONFIG).id
        api.connect_backend(project, url, ("ls", "pw"))
        t0 = time.perf_counter()
        storage = ls.import_storage.local.create(
            project=project, path=str(media / "line"), regex_filter=r".*\.mp4", use_blob_urls=True
        )
        ls.import_storage.local.sync(id=storage.id)
        tasks = api.tasks(project)
        ls.actions.create(id="retrieve_tasks_predictions", project=project)
        asked = time.perf_counter() - t0
        while True:
            have = sum(bool(list(ls.predictions.list(task=t["id"]))) for t in tasks)
            if have == len(tasks):
                break
            time.sleep(0.5)
        total = time.perf_counter() - t0
        print(
            f"import {len(tasks)} x {args.duration:.0f} s videos -> predictions from every task visible in "
            f"Label Studio: {total:.1f} s ({args.model}, 1 CPU worker; import + predict request {asked:.1f} s)"
        )
    finally:
        for p in reversed(procs):
            stop(p)
        redis.terminate()
    print("\ncommand: .venv/bin/python " + shlex.join(sys.argv))


if __name__ == "__main__":
    main()
