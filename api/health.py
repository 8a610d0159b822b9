"""Liveness and readiness."""

from __future__ import annotations

import time

import redis
from flask import Blueprint, current_app, jsonify

from api.auth import public
from api.openapi import document
from genqueue import config
from tasks import keys

bp = Blueprint("health", __name__)


def live_workers(client: redis.Redis) -> list[dict]:
    """The heartbeat of every live worker: queues, model, LoRA variants, device, running jobs (a worker
    beats once its models are loaded; keys.WORKERS scores each by when its heartbeat expires)."""
    ids = client.zrangebyscore(keys.WORKERS, time.time(), "+inf")
    with client.pipeline(transaction=False) as pipe:
        for worker_id in ids:
            pipe.hgetall(keys.worker(worker_id))
        heartbeats = pipe.execute()
    return [beat for beat in heartbeats if beat]


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
    """Ready when Redis answers and each queue this API sends jobs to has a worker with a loaded model."""
    client = current_app.extensions["genqueue.store"].redis
    try:
        client.ping()
        workers = live_workers(client)
        store = current_app.extensions["genqueue.store"]
        waiting = {queue: store.queue_depth(queue) for queue in config.QUEUES}  # shown, not judged
    except redis.RedisError as exc:
        reason = f"Redis is unreachable: {exc}"
        body = {"status": "unavailable", "redis": f"unreachable: {exc}", "workers": [], "missing": [reason]}
        return jsonify({**body, "reason": reason}), 503
    routed = [current_app.config["DEFAULT_QUEUE"]]  # every job this API submits goes there
    queues, missing = {}, []
    for queue in routed:
        serving = [w for w in workers if queue in w.get("queues", "").split(",") and w.get("model")]
        queues[queue] = {
            "workers": len(serving),
            "models": sorted({w["model"] for w in serving}),
            "waiting": waiting[queue],
        }
        if not serving:
            jobs = f" ({waiting[queue]} jobs waiting)" if waiting[queue] else ""
            missing.append(f"no worker with a loaded model consumes the {queue!r} queue{jobs}")
    body = {"status": "unavailable" if missing else "ready", "redis": "ok", "queues": queues, "workers": workers}
    if missing:
        body.update(missing=missing, reason="; ".join(missing))
    return jsonify(body), 503 if missing else 200
