"""The Celery app and all its settings, from ``STLLM_*`` environment variables.

    STLLM_BROKER_URL       redis://host:6379/0   (unset: jobs run in the calling process, no servers)
    STLLM_RESULT_BACKEND   defaults to the broker URL
    STLLM_MODEL            model a worker serves (default: builtin)
    STLLM_MODEL_STORE      model store directory (default: ~/.stllm/models)
    STLLM_TASK_TIME_LIMIT  hard limit of one task in seconds (default 3600); soft limit 90% of it
    STLLM_ROUND_BROKER_URL broker of fine-tune rounds (default: the next Redis database of the broker URL)
    STLLM_ROUND_TIME_LIMIT hard limit of one round in seconds (default 86400)

Queues: ``ask`` and ``prelabel`` (a worker serving both drains ``ask`` first) on ``app``; ``finetune`` on
``round_app``, in its own Redis database with a visibility timeout above the longest round, so a
prediction task's short timeout never requeues a running round and a round's long one never delays the
redelivery of a lost prediction task.
Settings follow what a GPU pool needs: late acks, prefetch of one, redelivery of a lost worker's task
(bounded retries so a poison video cannot loop), a visibility timeout above the longest task.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

from celery import Celery
from kombu import Exchange, Queue

QUEUES = ("ask", "prelabel", "finetune")


def broker_url() -> str | None:
    return os.environ.get("STLLM_BROKER_URL") or None


def round_broker_url() -> str | None:
    """Fine-tune rounds' broker: STLLM_ROUND_BROKER_URL, else the broker URL's Redis database + 1."""
    explicit = os.environ.get("STLLM_ROUND_BROKER_URL")
    if explicit or not broker_url():
        return explicit or None
    parts = urlsplit(broker_url())
    if not parts.scheme.startswith("redis"):
        return broker_url()
    db = int(parts.path.strip("/") or 0)
    return urlunsplit(parts._replace(path=f"/{db + 1}"))


def _config(url: str | None, hard: int, visibility_env: str) -> dict:
    visibility = int(os.environ.get(visibility_env, str(2 * hard)))
    return dict(
        broker_url=url or "memory://",
        result_backend=os.environ.get("STLLM_RESULT_BACKEND") or url or "cache+memory://",
        # each queue its own direct exchange and key: a message reaches exactly one queue
        task_queues=[Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES],
        task_default_queue="prelabel",
        task_default_exchange="prelabel",
        task_default_routing_key="prelabel",
        task_routes={
            "stllm.prelabel": {"queue": "prelabel"},
            "stllm.ask": {"queue": "ask"},
            "stllm.ping": {"queue": "ask"},
            "stllm.finetune": {"queue": "finetune"},
        },
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_reject_on_worker_lost=False,
        task_retry_on_worker_lost=True,
        task_time_limit=hard,
        task_soft_time_limit=int(hard * 0.9),
        broker_transport_options={
            "visibility_timeout": visibility,
            "unacked_restore_interval": int(os.environ.get("STLLM_RESTORE_INTERVAL", "10")),
            "unacked_restore_throttle": 1,
            "queue_order_strategy": "priority",
        },
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_proc_alive_timeout=120,
        worker_hijack_root_logger=False,
        task_track_started=True,
        result_extended=True,
        result_expires=7 * 24 * 3600,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
    )


app = Celery("stllm", include=["workers.tasks"])
app.conf.update(
    _config(broker_url(), int(os.environ.get("STLLM_TASK_TIME_LIMIT", "3600")), "STLLM_VISIBILITY_TIMEOUT")
)
round_app = Celery("stllm-rounds", include=["workers.tasks"])
round_app.conf.update(
    _config(
        round_broker_url(),
        int(os.environ.get("STLLM_ROUND_TIME_LIMIT", "86400")),
        "STLLM_ROUND_VISIBILITY_TIMEOUT",
    )
)
