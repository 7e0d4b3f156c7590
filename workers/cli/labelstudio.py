"""``stllm labelstudio``: serve the ML backend, connect it to a project, pre-label a project."""

from __future__ import annotations

import json
import os
import sys

from workers.cli.common import follow_job


def _connect(args) -> int:
    from workers.labelstudio.rest import LabelStudioAPI, LabelStudioError
    from workers.labelstudio.settings import BackendSettings

    s = BackendSettings()
    auth = (s.auth_user, s.auth_password or "") if s.auth_user else None
    try:
        ml = LabelStudioAPI.from_env(*s.connection()).connect_backend(args.project, args.backend_url, auth)
    except LabelStudioError as e:
        print(f"stllm labelstudio connect: {e}", file=sys.stderr)
        return 2
    print(f"project {args.project}: ML backend {ml} at {args.backend_url}", file=sys.stderr)
    return 0


def _serve(args) -> int:
    """The Flask app under gunicorn (a production WSGI server); this process becomes gunicorn."""
    cmd = [sys.executable, "-m", "gunicorn", "--bind", f"{args.host}:{args.port}"]
    cmd += ["--workers", str(args.workers), "--threads", "4", "--timeout", "120"]
    cmd += ["labelstudio_backend.app:create_app()"]
    print(f"serving the Label Studio ML backend on http://{args.host}:{args.port}", file=sys.stderr)
    os.execv(sys.executable, cmd)
    return 0


def _prelabel(args) -> int:
    """Pre-label every task of a project that has no prediction from the served version yet."""
    from workers.labelstudio.jobs import enqueue_prelabel
    from workers.labelstudio.rest import LabelStudioAPI, LabelStudioError
    from workers.labelstudio.settings import BackendSettings
    from workers.pool.client import served_version

    settings = BackendSettings()
    try:
        api = LabelStudioAPI.from_env(*settings.connection())
        xml = api.label_config(args.project)
        version = served_version()
        tasks = api.tasks(args.project)
    except LabelStudioError as e:
        print(f"stllm labelstudio prelabel: {e}", file=sys.stderr)
        return 2
    todo = [t for t in tasks if version not in t["prediction_versions"]]
    print(
        f"project {args.project}: {len(tasks)} tasks, {len(todo)} without a prediction from {version}",
        file=sys.stderr,
    )
    if not todo:
        return 0
    job_id, skipped = enqueue_prelabel(todo, xml, settings)
    for x in skipped:
        print(f"task {x['task']}: {x['reason']}", file=sys.stderr)
    if job_id is None:
        return 1
    st = follow_job(job_id, len(todo) - len(skipped), "prelabel", unit="task")
    for err in st.errors:
        print(err, file=sys.stderr)
    summary = {
        "job": job_id,
        "version": version,
        "done": st.done,
        "failed": st.failed,
        "skipped": len(skipped),
    }
    print(json.dumps(summary))
    return 0 if st.done or not st.total else 1


def _queue(args) -> int:
    """Print the project's unannotated tasks, most uncertain first; ``--view`` adds the Data Manager tab."""
    from workers.labelstudio.rest import LabelStudioAPI, LabelStudioError, queue_version, review_queue
    from workers.labelstudio.settings import BackendSettings
    from workers.pool.client import served_version

    try:
        api = LabelStudioAPI.from_env(*BackendSettings().connection())
        tasks = api.tasks(args.project)
        served = served_version()
        queue = review_queue(tasks, served)
        rows = queue[: args.top] if args.top else queue
        view = api.review_view(args.project, queue_version(queue, served)) if args.view else None
    except LabelStudioError as e:
        print(f"stllm labelstudio queue: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"project": args.project, "view": view, "tasks": rows}))
        return 0
    print(f"{'task':>8}  {'uncertainty':>11}  {'version':<12} video")
    for r in rows:
        u = f"{r['uncertainty']:.3f}" if r["uncertainty"] is not None else "-"
        print(f"{r['task']:>8}  {u:>11}  {r['model_version'] or '-':<12} {r['video']}")
    if view is not None:
        print(f"Data Manager tab {view} on project {args.project}: unannotated tasks, most uncertain first")
    return 0


def cmd_labelstudio(args) -> int:
    commands = {"prelabel": _prelabel, "connect": _connect, "serve": _serve, "queue": _queue}
    return commands[args.labelstudio_command](args)


def add_parsers(sub) -> None:
    p = sub.add_parser("labelstudio", help="Label Studio ML backend")
    lsub = p.add_subparsers(dest="labelstudio_command", required=True, metavar="ACTION")
    ls_serve = lsub.add_parser(
        "serve", help="serve /health, /setup, /predict, /webhook, /metrics with gunicorn"
    )
    ls_serve.add_argument("--host", default="127.0.0.1")
    ls_serve.add_argument("--port", type=int, default=9090)
    ls_serve.add_argument("--workers", type=int, default=2)
    ls_con = lsub.add_parser(
        "connect",
        help="connect a running backend to a project (with basic auth on its webhook too)",
        description="Adds the backend to the project's Model settings through Label Studio's API "
        "(LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY). With STLLM_LS_BASIC_AUTH_USER/PASSWORD set, Label Studio "
        "is given the credentials and the webhook it creates gets the same Authorization header.",
    )
    ls_con.add_argument("--project", type=int, required=True, help="the Label Studio project id")
    ls_con.add_argument("--backend-url", required=True, help="where Label Studio reaches this backend")
    ls_pre = lsub.add_parser(
        "prelabel",
        help="pre-label every task of a project that lacks a prediction from the served version",
        description="Lists the project's tasks through Label Studio's API (LABEL_STUDIO_URL, "
        "LABEL_STUDIO_API_KEY), queues those without a prediction from the served model version, and "
        "waits while the workers push their predictions into Label Studio. Local-files media is read "
        "under LOCAL_FILES_DOCUMENT_ROOT.",
    )
    ls_pre.add_argument("--project", type=int, required=True, help="the Label Studio project id")
    ls_q = lsub.add_parser(
        "queue",
        help="the tasks to review next: unannotated, most uncertain first",
        description="Lists the project's tasks that nobody has annotated, most uncertain first: the "
        "uncertainty is 1 - the score of the served version's prediction (its confidence in the whole video; "
        "see workers/review.py). With --view, also adds a Data Manager tab 'Review next (stllm)' on the "
        "project with the same tasks sorted by prediction score, so annotators get them in that order.",
    )
    ls_q.add_argument("--project", type=int, required=True, help="the Label Studio project id")
    ls_q.add_argument("--top", type=int, help="at most this many tasks")
    ls_q.add_argument("--view", action="store_true", help="add (or replace) the Data Manager tab")
    ls_q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_labelstudio)
