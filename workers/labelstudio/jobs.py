"""Pool jobs for Label Studio projects: pre-label tasks, and rounds on a project's corrections. The backend's
routes and the ``stllm labelstudio`` commands both submit through these."""

from __future__ import annotations

from collections.abc import Callable

from workers.labelstudio.config import parse_label_config
from workers.labelstudio.media import MediaError, media_source
from workers.labelstudio.settings import BackendSettings
from workers.pool import client
from workers.pool.app import broker_url
from workers.schemas import LabelStudioCorrections, LabelStudioSinkSpec, RoundRequest, RoundSettings

PREDICTIONS = "predictions.sqlite"  # the backend's prediction cache, under its state folder


def _may_carry_key(settings: BackendSettings) -> bool:
    """Whether a job may carry the API key: in the embedded default (nothing goes through a broker), or where
    STLLM_LS_SEND_KEY=1 opts in; by default the key stays out of Redis and workers use their own."""
    return settings.send_key or broker_url() is None


def enqueue_prelabel(
    tasks: list[dict],
    label_config: str,
    settings: BackendSettings,
    run_here: Callable[[Callable[[], str]], object] | None = None,
) -> tuple[str | None, list[dict]]:
    """Pre-label these Label Studio tasks (``{"id", "data"}``) on the pool: results go to the backend's
    prediction cache and, when a Label Studio URL and key are known, into Label Studio as predictions.

    Returns (job id or None when nothing could be queued, [{"task", "reason"}] for tasks whose media
    cannot be opened). ``run_here`` (a callable taking a function) runs the job in the embedded default,
    where no broker is configured; without it the job runs before this returns."""
    config = parse_label_config(label_config)
    url, key = settings.connection()
    videos, skipped = {}, []
    for t in tasks:
        try:
            source = (t.get("data") or {}).get(config.video_key, "")
            where = media_source(source, t["id"], settings.document_root, url, settings.allowed_hosts)
            videos.setdefault(where, []).append(t["id"])  # tasks on one file: decoded once, each predicted
        except MediaError as e:
            skipped.append({"task": t["id"], "reason": str(e)})
    if not videos:
        return None, skipped
    sink = LabelStudioSinkSpec(
        path=str(settings.state / PREDICTIONS),
        config=label_config,
        tasks=videos,
        url=url,
        api_key=key if _may_carry_key(settings) else None,  # else workers use their own LABEL_STUDIO_API_KEY
    )

    def submit() -> str:
        return client.submit_prelabel(list(videos), [x.model_dump() for x in config.labels], sink=sink)

    if broker_url() or run_here is None:
        return submit(), skipped
    run_here(submit)
    return "embedded", skipped


def start_round(pulled: dict, settings: BackendSettings) -> str:
    """Submit a fine-tune round on corrections pulled from Label Studio; returns the round's task id. The
    round's worker fetches uploaded media with its own LABEL_STUDIO_API_KEY (or the job's, see _may_carry_key)."""
    key = settings.connection()[1] if _may_carry_key(settings) else None
    payload = {**pulled, "api_key": key} if key else pulled
    return client.submit_round(
        RoundRequest(
            corrections=LabelStudioCorrections(pulled=payload),
            settings=RoundSettings.model_validate(settings.round_settings),
        )
    )
