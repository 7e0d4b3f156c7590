"""Label Studio's REST API, as this backend and the workers use it: read a project's config, tasks and
annotations; push validated predictions; flag tasks.

Connection: ``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY`` (a legacy token or a personal access token;
the SDK exchanges the latter for short-lived access tokens). The SDK is imported on first use.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

from workers.labelstudio.config import ProjectConfig, parse_label_config
from workers.labelstudio.media import MediaError, media_source
from workers.labelstudio.settings import origin
from workers.labelstudio.timeline import RegionError, segments_from_regions

log = logging.getLogger("stllm.labelstudio")


class LabelStudioError(RuntimeError):
    """Label Studio could not be reached, or refused what was asked; the message says which call."""


@functools.lru_cache(maxsize=16)
def _label_interface(label_config: str):
    """The SDK's parsed view of a label config (parsed once per config, not once per prediction)."""
    from label_studio_sdk.label_interface import LabelInterface

    return LabelInterface(label_config)


REVIEW_VIEW_TITLE = "Review next (stllm)"  # the Data Manager tab `stllm labelstudio queue --view` makes


@dataclass
class LabelStudioAPI:
    url: str
    api_key: str

    @classmethod
    def from_env(cls, url: str | None = None, api_key: str | None = None) -> LabelStudioAPI:
        """Connection from the arguments, else ``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY``. The
        environment's key goes only to the environment's Label Studio: given another ``url`` and no key,
        there is no key (a job naming a URL can never send this process's key elsewhere)."""
        env_url, env_key = os.environ.get("LABEL_STUDIO_URL"), os.environ.get("LABEL_STUDIO_API_KEY")
        if not api_key and (url is None or (env_url and origin(url) == origin(env_url))):
            api_key = env_key
        url = url or env_url
        if not url or not api_key:
            raise LabelStudioError(
                "Label Studio is not configured: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"
            )
        return cls(url.rstrip("/"), api_key)

    @property
    def client(self):
        if not hasattr(self, "_client"):
            from label_studio_sdk import LabelStudio

            self._client = LabelStudio(base_url=self.url, api_key=self.api_key, timeout=30)
        return self._client

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # the SDK raises its own ApiError, httpx errors, pydantic errors
            raise LabelStudioError(f"Label Studio {self.url}: {what} failed: {e}") from e

    def label_config(self, project: int) -> str:
        """The project's label config XML."""
        return self._call(f"reading project {project}", self.client.projects.get, id=project).label_config

    def tasks(self, project: int) -> list[dict]:
        """Every task of the project: id, data, meta, the model versions of its predictions, its
        annotations (dicts as Label Studio returns them)."""
        pages = self._call(
            f"listing tasks of project {project}", self.client.tasks.list, project=project, fields="all"
        )
        out = []
        for t in self._call(f"listing tasks of project {project}", list, pages):
            out.append(
                {
                    "id": t.id,
                    "data": t.data or {},
                    "meta": t.meta or {},
                    "prediction_versions": sorted({p.model_version or "" for p in (t.predictions or [])}),
                    "predictions": [
                        {"model_version": _get(p, "model_version") or "", "score": _get(p, "score")}
                        for p in (t.predictions or [])
                    ],
                    "annotations": [a if isinstance(a, dict) else a.dict() for a in (t.annotations or [])],
                }
            )
        return out

    def prediction_versions(self, task: int) -> set[str]:
        """The model versions that already have a prediction on this task."""
        preds = self._call(f"listing predictions of task {task}", self.client.predictions.list, task=task)
        return {p.model_version or "" for p in preds}

    def push_prediction(self, task: int, prediction: dict, label_config: str) -> int:
        """Validate ``prediction`` against the project's config, then create it on the task.

        Label Studio itself accepts predictions that do not match the config (and then silently does not show
        them), so a prediction that fails validation raises LabelStudioError and is not pushed."""
        if not _label_interface(label_config).validate_prediction(prediction):
            raise LabelStudioError(f"task {task}: the prediction does not match the project's label config")
        created = self._call(
            f"creating a prediction on task {task}",
            self.client.predictions.create,
            task=task,
            result=prediction["result"],
            score=prediction["score"],
            model_version=prediction["model_version"],
        )
        return created.id

    def review_view(self, project: int, version: str | None = None, title: str = REVIEW_VIEW_TITLE) -> int:
        """A Data Manager tab on ``project`` listing the tasks nobody has annotated yet, lowest prediction
        score (most uncertain) first; replaces an earlier tab of the same title. Returns its id.

        Label Studio's prediction score column averages only the predictions of the project's model version
        (and is empty where none matches; a new project's is ""): with ``version``, the project's model
        version is set to it, so the tab sorts on that version's scores and the labeling view shows its
        pre-labels."""
        if version:
            self._call(
                f"setting project {project}'s model version",
                self.client.projects.update,
                id=project,
                model_version=version,
            )
        views = self._call(f"listing views of project {project}", self.client.views.list, project=project)
        for v in views:
            if (v.data or {}).get("title") == title:
                self._call(f"deleting view {v.id}", self.client.views.delete, id=str(v.id))
        data = {
            "title": title,
            "ordering": ["tasks:predictions_score"],
            "filters": {
                "conjunction": "and",
                "items": [
                    {
                        "filter": "filter:tasks:total_annotations",
                        "operator": "equal",
                        "type": "Number",
                        "value": 0,
                    }
                ],
            },
        }
        view = self._call(
            f"creating a view on project {project}",
            self.client.views.create,
            project=project,
            data=data,
        )
        return view.id

    def flag_task(self, task: int, warning: str) -> None:
        """Set ``meta.stllm_warning`` on the task (the Data Manager can show and filter it), keeping the
        task's other meta keys."""
        current = self._call(f"reading task {task}", self.client.tasks.get, id=task).meta or {}
        self._call(
            f"flagging task {task}",
            self.client.tasks.update,
            id=str(task),
            meta={**current, "stllm_warning": warning},
        )

    def connect_backend(
        self, project: int, backend_url: str, auth: tuple[str, str] | None = None, title: str = "ST-LLM"
    ) -> int:
        """Connect this backend to a project (Label Studio calls /health and /setup, and adds a webhook to
        ``<backend_url>/webhook``); returns the ML backend's id.

        With basic auth, Label Studio sends the credentials on /setup and /predict but not on the webhook it
        adds: its headers are set here, or every webhook would be refused."""
        import base64

        backend_url = backend_url.rstrip("/")
        kwargs = {"auth_method": "NONE"}
        if auth:
            kwargs = {"auth_method": "BASIC_AUTH", "basic_auth_user": auth[0], "basic_auth_pass": auth[1]}
        ml = self._call(
            f"connecting {backend_url} to project {project}",
            self.client.ml.create,
            project=project,
            url=backend_url,
            title=title,
            is_interactive=False,
            **kwargs,
        )
        if auth:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            hooks = self._call("listing webhooks", self.client.webhooks.list, project=str(project))
            for hook in hooks:
                if hook.url.rstrip("/") == f"{backend_url}/webhook":
                    self._call(
                        f"setting the auth header of webhook {hook.id}",
                        self.client.webhooks.update,
                        id=hook.id,
                        headers={"Authorization": f"Basic {token}"},
                    )
        return ml.id


def _get(obj, name: str):
    """An attribute of an SDK object or a key of a dict (the SDK returns either, by endpoint)."""
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def review_queue(tasks: list[dict], version: str | None = None, top: int | None = None) -> list[dict]:
    """The tasks to review next: those without an annotation, most uncertain first (1 - the score of their
    prediction from ``version``, else of their latest prediction). Tasks without a prediction come last.
    Returns [{"task", "uncertainty", "model_version", "video"}], at most ``top``."""
    rows = []
    for t in tasks:
        if t.get("annotations"):
            continue
        preds = [p for p in t.get("predictions", []) if p.get("score") is not None]
        chosen = [p for p in preds if p["model_version"] == version] or preds[-1:]
        p = chosen[-1] if chosen else None
        rows.append(
            {
                "task": t["id"],
                "uncertainty": round(1.0 - float(p["score"]), 4) if p else None,
                "model_version": p["model_version"] if p else None,
                "video": next(iter(t.get("data", {}).values()), None),
            }
        )
    rows.sort(key=lambda r: (r["uncertainty"] is None, -(r["uncertainty"] or 0.0), r["task"]))
    return rows[:top] if top else rows


def queue_version(rows: list[dict], served: str | None) -> str | None:
    """The model version a review tab sorts on: ``served`` where any queued task has its prediction, else
    the version most of the queue's predictions come from (None without predictions)."""
    versions = [r["model_version"] for r in rows if r["model_version"]]
    if served in versions:
        return served
    return max(set(versions), key=lambda v: (versions.count(v), v)) if versions else None


def auth_header(url: str, api_key: str) -> str:
    """The Authorization header for Label Studio at ``url``: ``Token <key>`` for a legacy token; a personal
    access token (a JWT refresh token) is exchanged for a short-lived access token first."""
    if api_key.count(".") != 2:
        return f"Token {api_key}"
    import json
    import urllib.request

    req = urllib.request.Request(
        f"{url.rstrip('/')}/api/token/refresh",
        data=json.dumps({"refresh": api_key}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return f"Bearer {json.load(r)['access']}"
    except (OSError, KeyError, ValueError) as e:
        raise LabelStudioError(f"Label Studio {url}: exchanging the personal access token failed: {e}") from e


def pulled_from_tasks(
    tasks: list[dict],
    config: ProjectConfig,
    document_root: str | None,
    ls_url: str | None = None,
    allowed_hosts: frozenset[str] = frozenset(),
) -> dict:
    """Tasks with their ``annotations`` -> the corrections a round freezes into a snapshot.

    One entry per task with a submitted (not cancelled) annotation: its latest annotation's timeline regions
    as segments in seconds, the video's path under the document root, and the ids that trace it (task,
    annotation, and the prediction it started from: a pre-label accepted unchanged counts as a confirmation).
    A task whose media cannot be resolved, or whose annotation is malformed (a reversed range, a frame 0, a
    missing start, a label the project does not have...), is listed under ``skipped`` with the reason and
    the rest go on; remote media stays a URL that the worker downloads."""
    entries, skipped = [], []
    for t in tasks:
        task_id = t.get("id") if isinstance(t, dict) else None
        try:
            if not isinstance(t, dict) or not isinstance(t.get("data") or {}, dict):
                raise RegionError("the task is not an object with a 'data' object")
            annotations = t.get("annotations") or []
            if not isinstance(annotations, list):
                raise RegionError("'annotations' is not a list")
            done = [a for a in annotations if isinstance(a, dict) and not a.get("was_cancelled")]
            if not done:
                continue
            latest = max(done, key=lambda a: (str(a.get("updated_at") or ""), str(a.get("id", ""))))
            source = (t.get("data") or {}).get(config.video_key, "")
            if not isinstance(source, str):
                raise MediaError(f"the video URL is not a string: {source!r}")
            path = media_source(source, task_id, document_root, ls_url, allowed_hosts)
            segments = segments_from_regions(latest.get("result") or [], config)
        except (MediaError, RegionError) as e:
            skipped.append({"task": task_id, "reason": str(e)})
            continue
        entries.append(
            {
                "task": task_id,
                "annotation": latest.get("id"),
                "parent_prediction": latest.get("parent_prediction"),
                "video": str(path),
                "segments": segments,
            }
        )
    return {"labels": [x.model_dump() for x in config.labels], "tasks": entries, "skipped": skipped}


def pull_corrections(
    api: LabelStudioAPI, project: int, document_root: str | None, allowed_hosts: frozenset[str] = frozenset()
) -> dict:
    """Every annotated task of a project, pulled through the API (see :func:`pulled_from_tasks`)."""
    config = parse_label_config(api.label_config(project))
    pulled = pulled_from_tasks(api.tasks(project), config, document_root, api.url, allowed_hosts)
    return {"project": project, "url": api.url, **pulled}
