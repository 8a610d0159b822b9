"""Liveness and readiness."""

from __future__ import annotations

import redis
from flask import Blueprint, current_app, jsonify

from api.auth import public
from api.openapi import document
from tasks import keys

bp = Blueprint("health", __name__)


@bp.get("/healthz")
@public
@document("The API process is alive", tags=["Health"], responses={200: ("Always {status: ok}",)})
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/readyz")
@public
@document(
    "Ready: Redis answers and a worker with a loaded model consumes the default queue",
    tags=["Health"],
    responses={200: ("Ready, with the live workers",), 503: ("Not ready, and why",)},
)
def readyz():
    """Ready when Redis answers and some worker with a loaded model consumes each queue."""
    client = current_app.extensions["genqueue.store"].redis
    try:
        client.ping()
        workers = [client.hgetall(key) for key in client.scan_iter(keys.WORKER_PATTERN)]
    except redis.RedisError as exc:
        return jsonify({"status": "unavailable", "redis": f"unreachable: {exc}", "workers": []}), 503
    queue = current_app.config["DEFAULT_QUEUE"]
    serving = [w for w in workers if queue in w.get("queues", "").split(",")]
    body = {"status": "ready" if serving else "unavailable", "redis": "ok", "workers": workers}
    if not serving:
        body["reason"] = f"no worker with a loaded model consumes the {queue!r} queue"
    return jsonify(body), 200 if serving else 503
