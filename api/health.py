"""Liveness and readiness."""

from __future__ import annotations

import redis
from flask import Blueprint, current_app, jsonify

from api.auth import authenticated, public
from api.openapi import document
from api.schemas import HealthSchema, ReadinessSchema
from api.service import job_service, model_service
from config import QUEUES

bp = Blueprint("health", __name__)


@bp.get("/healthz")
@public
@document("The API process is alive", tags=["Health"], responses={200: ("Always {status: ok}", HealthSchema)})
def healthz():
    return jsonify({"status": "ok"})


@bp.get("/readyz")
@public
@document(
    "Ready: Redis answers and a worker with a loaded model consumes the default queue",
    description=(
        "Anyone gets the status and what is missing; a caller with a valid API key (or any caller of an "
        "open API) also gets the queues, models, workers and Redis's error."
    ),
    tags=["Health"],
    responses={200: ("Ready", ReadinessSchema), 503: ("Not ready, and what is missing", ReadinessSchema)},
)
def readyz():
    """Ready when Redis answers and each queue this API sends jobs to has a worker with a loaded model."""
    body, details = readiness()
    if authenticated():
        body.update(details)
    return jsonify(body), 200 if body["status"] == "ready" else 503


def readiness() -> tuple[dict, dict]:
    """(what anyone may see: status and what is missing, the details only a key holder sees)."""
    try:
        job_service().store.redis.ping()
        workers = model_service().registry.live()
        waiting = {queue: job_service().store.queue_depth(queue) for queue in QUEUES}  # shown, not judged
    except redis.RedisError as exc:
        missing = ["Redis is unreachable"]
        return {"status": "unavailable", "missing": missing}, {"redis": f"unreachable: {exc}", "workers": []}
    routed = [current_app.config["DEFAULT_QUEUE"]]  # every job this API submits goes there
    queues, missing = {}, []
    for queue in routed:
        serving = [w for w in workers if w.serves(queue)]
        queues[queue] = {
            "workers": len(serving),
            "models": sorted({w.model for w in serving}),
            "waiting": waiting[queue],
        }
        if not serving:
            missing.append(f"no worker with a loaded model consumes the {queue!r} queue")
    details = {"redis": "ok", "queues": queues, "workers": [w.to_view() for w in workers]}
    return {"status": "unavailable" if missing else "ready", "missing": missing}, details
