"""Liveness and readiness."""

from __future__ import annotations

import redis
from flask import Blueprint, current_app, jsonify

from tasks import keys

bp = Blueprint("health", __name__)


def live_workers() -> list[dict]:
    """The heartbeat of every live worker: queues, model, device (a worker beats once its model is loaded)."""
    client = current_app.extensions["genqueue.store"].redis
    return [client.hgetall(key) for key in client.scan_iter(keys.WORKER_PATTERN)]


@bp.get("/healthz")
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/readyz")
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
