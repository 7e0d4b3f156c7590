"""The Label Studio ML-backend protocol as a small Flask app: thin routes over :class:`Backend`.

    GET  /health, /           {"status": "UP", "model_version"}            cheap: Label Studio allows 1 s
    POST /setup               {"model_version"} or 400 for a config it cannot serve
    POST /predict             predictions the workers already made for these tasks and the served version;
                              the rest are enqueued (never run inside the request)
    POST /webhook             annotation events recorded (deduplicated) for the next round; START_TRAINING
                              pulls the project's annotations and submits a round; 4xx for bad payloads
    POST /train               the older training call with the annotated tasks inline: submits a round
    GET  /metrics             request (by route, after the auth check) and event counters

Every client error is a 4xx with a JSON ``{"error"}``: bad JSON or types 400, credentials 401, a body over
``STLLM_LS_MAX_BODY`` 413. Credentials compare in constant time; there is no static-file route.

Settings: ``workers.labelstudio.settings.BackendSettings`` (environment; see README.md). Imports no torch.
"""

from __future__ import annotations

import hmac
import re

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from labelstudio_backend.backend import Backend, BadRequest
from workers.labelstudio.config import ConfigError
from workers.labelstudio.settings import BackendSettings
from workers.pool.client import served_version

OPEN_ROUTES = ("/health", "/")  # Label Studio polls these without credentials; they reveal only the version


def _json_body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _same(given: str | None, expected: str) -> bool:
    """Constant-time comparison (a timing difference must not reveal how much of a credential was right)."""
    return hmac.compare_digest((given or "").encode(), expected.encode())


def _metric_line(name: str, value: int) -> str:
    """``name value`` with the name reduced to [a-zA-Z0-9_]: nothing a client sends can add a line."""
    return f"{re.sub(r'[^a-zA-Z0-9_]', '_', name)} {value}\n"


def create_app(settings: BackendSettings | None = None) -> Flask:
    """The backend as a Flask app (``stllm labelstudio serve`` runs it under gunicorn)."""
    backend = Backend(settings)
    s, metrics = backend.s, backend.metrics
    app = Flask("stllm-labelstudio", static_folder=None)  # no implicit /static route
    app.config["MAX_CONTENT_LENGTH"] = s.max_body

    @app.before_request
    def _auth():
        if s.auth_user and request.path not in OPEN_ROUTES:
            a = request.authorization
            ok = a is not None and a.type == "basic"
            ok = _same(a.username if ok else "", s.auth_user) & _same(
                a.password if ok else "", s.auth_password
            )
            if not ok:
                metrics["requests unauthorized"] += 1
                return Response("authentication required", 401, {"WWW-Authenticate": 'Basic realm="stllm"'})
        # by route, not by path: a client's paths cannot add counters
        metrics[f"requests {request.url_rule.rule if request.url_rule else 'unmatched'}"] += 1
        return None

    @app.errorhandler(BadRequest)
    @app.errorhandler(ConfigError)
    def _bad(e):
        metrics["rejected"] += 1
        return jsonify({"error": str(e)}), 400

    @app.errorhandler(HTTPException)
    def _http(e: HTTPException):  # 404, 405, 413 ...: JSON like every other answer
        return jsonify({"error": e.description or e.name}), e.code

    @app.get("/")
    @app.get("/health")
    def health():
        return jsonify({"status": "UP", "model_class": "ST-LLM", "model_version": served_version()})

    @app.post("/setup")
    def setup():
        return jsonify(
            backend.setup(_json_body(), caller=request.remote_addr, authenticated=bool(s.auth_user))
        )

    @app.post("/predict")
    def predict():
        return jsonify(backend.predict(_json_body()))

    @app.post("/webhook")
    def webhook():
        body, status = backend.webhook(_json_body())
        return jsonify(body), status

    @app.post("/train")
    def train():
        return jsonify(backend.train(_json_body())), 201

    @app.get("/metrics")
    def metrics_view():
        lines = "".join(_metric_line(k, v) for k, v in sorted(metrics.items()))
        return Response(lines, mimetype="text/plain")

    return app
