"""FiftyOne plugin: pre-label events, ask questions over videos, start fine-tune rounds, follow jobs.

Each operator builds a job from the target view and hands it to ``workers.pool.client``: with a broker
configured (``STLLM_BROKER_URL``) the pool does the work and the operator returns at once with a job id;
without one the work runs here, in FiftyOne's delegated execution (the operators ask for delegation then,
so a large view never runs inside the App's 600 s immediate window). Results land on the samples through
the workers' FiftyOne sink. This package never imports torch.
"""

from __future__ import annotations

import time

import fiftyone.operators as foo
import fiftyone.operators.types as types

from workers.schemas import PrelabelSettings, TrainSettings, default
from workers.settings import current

FIELD_DEFAULT = "stllm_events"
ANSWER_DEFAULT = "stllm_answer"
RUNS_KEY = "stllm_runs"
# (PrelabelSettings field, form input kind, label) of the pre-label form; defaults come from PrelabelSettings
FORM_SETTINGS = [
    ("window_s", "float", "Window (s)"),
    ("stride_s", "float", "Stride (s)"),
    ("frames_per_window", "int", "Frames per window"),
    ("high", "float", "P(yes) that starts an event"),
]


def _pool_configured() -> bool:
    return bool(current().broker_url)


def _temporal_fields(dataset) -> list[str]:
    import fiftyone as fo

    return [name for name, f in dataset.get_field_schema(embedded_doc_type=fo.TemporalDetections).items()]


def _check_target(ctx, inputs: types.Object) -> bool:
    """Adds a form error when the dataset is not a video dataset; returns whether it is."""
    if ctx.dataset is None or ctx.dataset.media_type != "video":
        media = ctx.dataset.media_type if ctx.dataset is not None else "none"
        inputs.view(
            "not_video",
            types.Error(
                label="Not a video dataset",
                description=f"these operators need videos; this dataset holds {media}",
            ),
        )
        inputs.str(
            "media_check", invalid=True, error_message=f"media type is {media}, not video", required=True
        )
        return False
    return True


def _record_run(ctx, kind: str, job_id: str, settings: dict) -> None:
    ds = ctx.dataset
    runs = dict(ds.info.get(RUNS_KEY, {}))
    runs[job_id] = {"kind": kind, "started": time.time(), "pool": _pool_configured(), **settings}
    ds.info[RUNS_KEY] = runs
    ds.save()


def _target_samples(ctx) -> tuple[list[str], dict[str, list[str]]]:
    """The target view's distinct video files (each decoded once) and, per file, the ids of its samples."""
    view = ctx.target_view()
    ids: dict[str, list[str]] = {}
    for sid, path in zip(view.values("id"), view.values("filepath"), strict=True):
        ids.setdefault(path, []).append(sid)
    return list(ids), ids


class _PoolOperator(foo.Operator):
    """An operator whose work runs on the pool when one is configured, else as a delegated operation."""

    name = label = description = ""

    @property
    def config(self):
        return foo.OperatorConfig(
            name=self.name,
            label=self.label,
            description=self.description,
            allow_immediate_execution=True,
            allow_delegated_execution=True,
            default_choice_to_delegated=True,
            dynamic=True,
        )

    def resolve_delegation(self, ctx):
        return not _pool_configured()  # without a pool the work itself runs: never in the immediate window


def _form_labels(ctx) -> list[str]:
    """The event labels typed in the form, else the classes of the chosen field."""
    labels = list(ctx.params.get("labels") or [])
    if not labels and ctx.params.get("labels_from_field"):
        labels = ctx.dataset.distinct(f"{ctx.params['labels_from_field']}.detections.label")
    return labels


class PrelabelEvents(_PoolOperator):
    name = "prelabel_events"
    label = "ST-LLM: pre-label events"
    description = "Event segments with scores on every video of the target, from the served model version"

    def resolve_input(self, ctx):
        inputs = types.Object()
        if _check_target(ctx, inputs):
            inputs.view_target(ctx)
            fields = _temporal_fields(ctx.dataset)
            inputs.list(
                "labels", types.String(), label="Event labels", description="'name' or 'name: description'"
            )
            if fields:
                inputs.enum("labels_from_field", fields, label="...or the classes of this field")
            if not _form_labels(ctx):
                inputs.str(
                    "labels_check", invalid=True, required=True, error_message="give at least one event label"
                )
            field = ctx.params.get("output_field", FIELD_DEFAULT)
            schema = ctx.dataset.get_field_schema()
            wrong_type = field in schema and field not in fields
            inputs.str(
                "output_field",
                default=FIELD_DEFAULT,
                label="Output field",
                invalid=wrong_type,
                error_message=f"field {field!r} exists and is not TemporalDetections" if wrong_type else None,
            )
            for name, kind, label in FORM_SETTINGS:
                getattr(inputs, kind)(name, default=default(PrelabelSettings, name), label=label)
        return types.Property(inputs, view=types.View(label="Pre-label events"))

    def execute(self, ctx):
        from workers.pool import client
        from workers.schemas import FiftyOneSinkSpec

        labels = _form_labels(ctx)
        field = ctx.params.get("output_field", FIELD_DEFAULT)
        chosen = {name: ctx.params[name] for name, _, _ in FORM_SETTINGS if ctx.params.get(name) is not None}
        settings = PrelabelSettings(**chosen)
        paths, ids = _target_samples(ctx)
        ctx.set_progress(progress=0.0, label=f"0/{len(paths)} videos")
        sink = FiftyOneSinkSpec(dataset=ctx.dataset.name, field=field, job="prelabel", ids=ids)
        job = client.submit_prelabel(paths, labels, settings, sink=sink)
        _record_run(
            ctx, "prelabel", job, {"field": field, "labels": labels, "settings": settings.model_dump()}
        )
        st = client.status(job)
        if st.finished:
            ctx.trigger("reload_dataset")
        return {"job_id": job, "videos": len(paths), "state": st.state, "done": st.done, "failed": st.failed}

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.str("job_id", label="Job")
        outputs.int("videos", label="Videos")
        outputs.str("state", label="State")
        return types.Property(outputs)


class AskVideos(_PoolOperator):
    name = "ask_videos"
    label = "ST-LLM: ask a question"
    description = "An answer, P(yes) for yes/no questions, and the best-matching moment on each video"

    def resolve_input(self, ctx):
        inputs = types.Object()
        if _check_target(ctx, inputs):
            inputs.view_target(ctx)
            question = (ctx.params.get("question") or "").strip()
            inputs.str(
                "question",
                required=True,
                label="Question",
                description="e.g. 'Does the operator skip the torque check?'",
                invalid=ctx.params.get("question") is not None and not question,
                error_message="the question is empty",
            )
            inputs.str("output_field", default=ANSWER_DEFAULT, label="Output field")
        return types.Property(inputs, view=types.View(label="Ask over videos"))

    def execute(self, ctx):
        from workers.pool import client
        from workers.schemas import FiftyOneSinkSpec

        question = ctx.params["question"].strip()
        field = ctx.params.get("output_field", ANSWER_DEFAULT)
        paths, ids = _target_samples(ctx)
        sink = FiftyOneSinkSpec(dataset=ctx.dataset.name, field=field, job="ask", ids=ids)
        job = client.submit_ask(paths, question, sink=sink)
        _record_run(ctx, "ask", job, {"field": field, "question": question})
        st = client.status(job)
        if st.finished:
            ctx.trigger("reload_dataset")
        return {"job_id": job, "videos": len(paths), "state": st.state}


class FinetuneRound(_PoolOperator):
    name = "finetune_round"
    label = "ST-LLM: start a fine-tune round"
    description = "Train on a field of human-checked events; promoted only if it measures better"

    def resolve_input(self, ctx):
        inputs = types.Object()
        if _check_target(ctx, inputs):
            fields = _temporal_fields(ctx.dataset)
            if not fields:
                inputs.str(
                    "gt_check",
                    invalid=True,
                    required=True,
                    error_message="no TemporalDetections field to learn from",
                )
            else:
                inputs.enum("gt_field", fields, required=True, label="Human-checked events field")
            views = ctx.dataset.list_saved_views()
            if views:
                inputs.enum("view_name", views, label="Saved view (optional)")
            inputs.int("steps", default=default(TrainSettings, "steps"), label="Training steps")
            inputs.bool("force", default=False, label="Promote whatever it measures")
            inputs.int(
                "next_batch",
                default=0,
                label="Then suggest this many videos to correct next",
                description="from the dataset's samples outside the saved view, most uncertain first",
            )
        return types.Property(inputs, view=types.View(label="Fine-tune round"))

    def execute(self, ctx):
        from workers.pool import client
        from workers.schemas import FiftyOneCorrections, RoundRequest, RoundSettings

        corrections = FiftyOneCorrections(
            dataset=ctx.dataset.name, gt_field=ctx.params["gt_field"], view=ctx.params.get("view_name")
        )
        settings = RoundSettings(
            train=TrainSettings(steps=ctx.params.get("steps") or default(TrainSettings, "steps")),
            force=bool(ctx.params.get("force")),
            next_batch=int(ctx.params.get("next_batch") or 0),
        )
        steps = settings.train.steps

        def report(stage: str, info: dict) -> None:
            """Stage, step and loss in the operation's progress (the App's runs page, the CLI launcher)."""
            if stage == "train":
                label = f"training: step {info.get('step')}/{steps}, loss {info.get('loss')}"
                ctx.set_progress(progress=0.1 + 0.8 * info.get("step", 0) / steps, label=label)
            elif stage == "features":
                label = f"reading corrections: video {info.get('video')}/{info.get('of')}"
                ctx.set_progress(progress=0.1 * info.get("video", 0) / max(1, info.get("of", 1)), label=label)
            else:
                ctx.set_progress(progress=0.95 if stage == "gate" else 0.0, label=f"{stage}: {info}")

        ctx.set_progress(progress=0.0, label="round submitted")
        request = RoundRequest(corrections=corrections, settings=settings)
        task = client.submit_round(request, report)  # without a pool the round runs here, reporting
        _record_run(ctx, "round", task, {"gt_field": ctx.params["gt_field"]})
        if ctx.delegated:  # a delegated run may wait: it follows the round to its end
            state, info = client.follow_round(task, report, every_s=2.0)
        else:  # an immediate run returns at once; "job status" follows the round
            state, info = client.round_status(task)
        keys = ("version", "promoted", "reason", "next_batch")
        return {"job_id": task, "state": state, **{k: info.get(k) for k in keys}}


REVIEW_VIEW_DEFAULT = "stllm_review_next"


def review_view(view, field: str, top: int | None = None):
    """``view``'s pre-labeled samples, most uncertain first (``<field>_uncertainty`` highest first; see
    ``workers.review``), at most ``top`` of them."""
    from fiftyone import ViewField as F

    key = f"{field}_uncertainty"
    out = view.match(F(key) != None).sort_by(key, reverse=True)  # noqa: E711 (a FiftyOne expression)
    return out.limit(top) if top else out


class ReviewNext(foo.Operator):
    """Saves the target view's pre-labeled videos as a view sorted by how unsure the model is, most unsure
    first, for the QA engineer to correct next; each detection carries its own ``uncertainty`` too."""

    @property
    def config(self):
        return foo.OperatorConfig(
            name="review_next",
            label="ST-LLM: review next (most uncertain first)",
            description="Save a view of the target's videos sorted by the model's uncertainty, highest first",
            dynamic=True,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        if _check_target(ctx, inputs):
            fields = [
                f
                for f in _temporal_fields(ctx.dataset)
                if f"{f}_uncertainty" in ctx.dataset.get_field_schema()
            ]
            if not fields:
                inputs.str(
                    "field_check",
                    invalid=True,
                    required=True,
                    error_message="no pre-labeled field with uncertainty: run 'pre-label events' first",
                )
            else:
                inputs.enum("field", fields, default=fields[0], required=True, label="Pre-label field")
            inputs.int("top", label="At most this many videos (empty: all)")
            inputs.str("view_name", default=REVIEW_VIEW_DEFAULT, required=True, label="Saved view name")
        return types.Property(inputs, view=types.View(label="Review next"))

    def execute(self, ctx):
        field = ctx.params.get("field") or FIELD_DEFAULT
        name = ctx.params.get("view_name") or REVIEW_VIEW_DEFAULT
        view = review_view(ctx.target_view(), field, ctx.params.get("top"))
        ctx.dataset.save_view(name, view, overwrite=True)
        ctx.trigger("set_view", params={"name": name})
        return {"view": name, "samples": len(view)}

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.str("view", label="Saved view")
        outputs.int("samples", label="Videos to review")
        return types.Property(outputs)


class JobStatus(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(name="job_status", label="ST-LLM: job status", dynamic=True)

    def execute(self, ctx):
        from workers.pool import client

        runs = ctx.dataset.info.get(RUNS_KEY, {})
        jobs, any_finished = [], False
        for job_id, run in sorted(runs.items(), key=lambda kv: -kv[1]["started"]):
            if run["kind"] == "round":
                state, info = client.round_status(job_id)
                jobs.append(
                    {
                        "job_id": job_id,
                        "kind": "round",
                        "state": state,
                        **{k: info.get(k) for k in ("version", "promoted")},
                    }
                )
                continue
            try:
                st = client.status(job_id)
            except KeyError:
                jobs.append({"job_id": job_id, "kind": run["kind"], "state": "EXPIRED"})
                continue
            any_finished |= st.finished
            jobs.append(
                {
                    "job_id": job_id,
                    "kind": run["kind"],
                    "state": st.state,
                    "done": st.done,
                    "failed": st.failed,
                    "total": st.total,
                    "errors": st.errors[:20],
                }
            )
        if any_finished:
            ctx.trigger("reload_dataset")
        return {"jobs": jobs}

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.list("jobs", types.Object(), label="Jobs started on this dataset")
        return types.Property(outputs)


def register(p):
    p.register(PrelabelEvents)
    p.register(AskVideos)
    p.register(FinetuneRound)
    p.register(JobStatus)
    p.register(ReviewNext)
