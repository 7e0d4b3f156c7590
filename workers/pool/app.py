"""The Celery app and all its settings (from ``workers.settings``: STLLM_BROKER_URL, STLLM_RESULT_BACKEND,
STLLM_ROUND_BROKER_URL, STLLM_TASK_TIME_LIMIT, STLLM_ROUND_TIME_LIMIT, the visibility timeouts).

With no broker configured, jobs run in the calling process (the embedded default, no servers).
Queues: ``ask`` and ``prelabel`` (a worker serving both drains ``ask`` first) on ``app``; ``finetune`` on
``round_app``, in its own Redis database with a visibility timeout above the longest round, so a
prediction task's short timeout never requeues a running round and a round's long one never delays the
redelivery of a lost prediction task.
Settings follow what a GPU pool needs: late acks, prefetch of one, redelivery of a lost worker's task
(bounded retries so a poison video cannot loop), a visibility timeout above the longest task.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from celery import Celery
from kombu import Exchange, Queue

from workers.settings import current

QUEUES = ("ask", "prelabel", "finetune")


def broker_url() -> str | None:
    return current().broker_url


def round_broker_url() -> str | None:
    """Fine-tune rounds' broker: STLLM_ROUND_BROKER_URL, else the broker URL's Redis database + 1."""
    explicit = current().round_broker_url
    if explicit or not broker_url():
        return explicit
    parts = urlsplit(broker_url())
    if not parts.scheme.startswith("redis"):
        return broker_url()
    db = int(parts.path.strip("/") or 0)
    return urlunsplit(parts._replace(path=f"/{db + 1}"))


def _config(url: str | None, hard: int, visibility: int | None) -> dict:
    visibility = visibility or 2 * hard
    return dict(
        broker_url=url or "memory://",
        result_backend=current().result_backend or url or "cache+memory://",
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
        # A task whose process died (the OOM killer takes the prefork child) is sent again as a retry
        # (task_retry_on_worker_lost, as Celery 5.7's worker/request.py reads it) up to the task's
        # max_retries; it resumes at the video it died on and a video that kills it twice fails alone
        # (workers.pool.tasks._run).
        task_reject_on_worker_lost=False,
        task_retry_on_worker_lost=True,
        task_time_limit=hard,
        task_soft_time_limit=int(hard * 0.9),
        broker_transport_options={
            "visibility_timeout": visibility,
            "unacked_restore_interval": current().restore_interval,
            "unacked_restore_throttle": 1,
            "queue_order_strategy": "priority",
        },
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_proc_alive_timeout=120,
        worker_hijack_root_logger=False,
        task_track_started=True,
        # results keep no copy of the task's arguments (a job's sink, a Label Studio key): status needs none
        result_extended=False,
        result_expires=7 * 24 * 3600,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
    )


_settings = current()
app = Celery("stllm", include=["workers.pool.tasks"])
app.conf.update(_config(broker_url(), _settings.task_time_limit, _settings.visibility_timeout))
round_app = Celery("stllm-rounds", include=["workers.pool.tasks"])
round_app.conf.update(
    _config(round_broker_url(), _settings.round_time_limit, _settings.round_visibility_timeout)
)
