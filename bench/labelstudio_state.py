"""The Label Studio backend's request latency against the history it keeps: /predict (8 tasks whose
predictions are cached) and /webhook (a new correction, fsync-ed before the answer) p50/p95 with 1k and 100k
stored predictions and corrections, through Flask's test client (no network), embedded default.

    .venv/bin/python bench/labelstudio_state.py [--sizes 1000 100000] [--calls 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

CONFIG = """<View><Video name="video" value="$video" frameRate="25"/>
<TimelineLabels name="events" toName="video"><Label value="jam"/><Label value="hand"/></TimelineLabels></View>"""


def _prediction(task: int) -> dict:
    region = {
        "id": f"r{task}",
        "from_name": "events",
        "to_name": "video",
        "type": "timelinelabels",
        "score": 0.9,
        "value": {"ranges": [{"start": 10, "end": 80}], "timelinelabels": ["jam"]},
    }
    return {"result": [region] * 4, "score": 0.9, "model_version": "round-3"}


def fill(state: Path, n: int) -> None:
    """n cached predictions and n recorded corrections, as a long-lived project leaves them."""
    from labelstudio_backend.ledger import RoundLedger
    from workers.sinks.files import SqliteStore

    store = SqliteStore(state / "predictions.sqlite")
    for a in range(0, n, 5000):
        store.write(
            [
                {"video": f"task:{i}", "model_version": "round-3", "task": i, "prediction": _prediction(i)}
                for i in range(a, min(n, a + 5000))
            ]
        )
    ledger = RoundLedger(state / "rounds.sqlite")
    with ledger._db() as db:
        db.executemany(
            "INSERT OR IGNORE INTO corrections (project, annotation, stamp, pending) VALUES (1, ?, 'x', 0)",
            [(str(i),) for i in range(n)],
        )
    with open(state / "corrections.jsonl", "w") as f:
        for i in range(n):
            f.write(
                json.dumps({"id": f"annotation:{i}@x", "action": "ANNOTATION_CREATED", "annotation": i})
                + "\n"
            )


def p(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 100000])
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    os.environ.pop("STLLM_BROKER_URL", None)
    import workers.pool.client as pool

    pool.served_version = lambda: "round-3"  # the figure is the backend's own cost, not a model store's
    import labelstudio_backend.backend as backend_module

    backend_module.served_version = lambda: "round-3"
    from labelstudio_backend.app import create_app
    from workers.labelstudio.settings import BackendSettings

    print(f"{'history':>8} {'/predict p50':>13} {'p95':>8} {'/webhook p50':>13} {'p95':>8}")
    for n in args.sizes:
        state = Path(tempfile.mkdtemp(prefix="stllm-ls-state-"))
        fill(state, n)
        client = create_app(BackendSettings(state=state)).test_client()
        predict, hook = [], []
        for k in range(args.calls):
            tasks = [
                {"id": (k * 8 + j) % n, "data": {"video": "/data/local-files/?d=v.mp4"}} for j in range(8)
            ]
            t = time.perf_counter()
            r = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG})
            predict.append(time.perf_counter() - t)
            assert r.status_code == 200 and all(r.json["results"]), r.json
            body = {
                "action": "ANNOTATION_CREATED",
                "project": {"id": 1},
                "task": {"id": 1},
                "annotation": {"id": n + k, "result": [], "updated_at": "2026-12-01T10:00:00Z"},
            }
            t = time.perf_counter()
            r = client.post("/webhook", json=body)
            hook.append(time.perf_counter() - t)
            assert r.status_code == 201
        print(
            f"{n:>8} {p(predict, 0.5):>10.1f} ms {p(predict, 0.95):>5.1f} ms "
            f"{statistics.median(hook) * 1000:>10.1f} ms {p(hook, 0.95):>5.1f} ms"
        )


if __name__ == "__main__":
    main()
