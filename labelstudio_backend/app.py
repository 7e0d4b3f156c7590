"""The Label Studio ML-backend protocol as a small Flask app: thin routes over :class:`Backend`.

    GET  /health, /           {"status": "UP", "model_version"}            cheap: Label Studio allows 1 s
    POST /setup               {"model_version"} or 400 for a config it cannot serve
    POST /predict             predictions the workers already made for these tasks and the served version;
                              the rest are enqueued (never run inside the request)
    POST /webhook             annotation events recorded (deduplicated) for the next round; START_TRAINING
                              pulls the project's annotations and submits a round; 4xx for bad payloads
    POST /train               the older training call with the annotated tasks inline: submits a round
    GET  /metrics             request and event counters

Settings: ``workers.labelstudio.settings.BackendSettings`` (environment; see README.md). Imports no torch.
"""

from __future__ import annotations

from flask import Flask, Response, jsonify, request

from labelstudio_backend.backend import Backend, BadRequest
from workers.labelstudio.config import ConfigError
from workers.labelstudio.settings import BackendSettings
from workers.pool.client import served_version


def _json_body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def create_app(settings: BackendSettings | None = None) -> Flask:
    """The backend as a Flask app (``stllm labelstudio serve`` runs it under gunicorn)."""
    backend = Backend(settings)
    s, metrics = backend.s, backend.metrics
    app = Flask("stllm-labelstudio")

    @app.before_request
    def _auth():
        metrics[f"requests {request.path}"] += 1
        if s.auth_user and request.path not in ("/health", "/"):
            a = request.authorization
            if a is None or a.username != s.auth_user or a.password != s.auth_password:
                return Response("authentication required", 401, {"WWW-Authenticate": 'Basic realm="stllm"'})
        return None

    @app.errorhandler(BadRequest)
    @app.errorhandler(ConfigError)
    def _bad(e):
        metrics["rejected"] += 1
        return jsonify({"error": str(e)}), 400

    @app.get("/")
    @app.get("/health")
    def health():
        return jsonify({"status": "UP", "model_class": "ST-LLM", "model_version": served_version()})

    @app.post("/setup")
    def setup():
        return jsonify(backend.setup(_json_body()))

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
        lines = "".join(f"{k.replace(' ', '_')} {v}\n" for k, v in sorted(metrics.items()))
        return Response(lines, mimetype="text/plain")

    return app
