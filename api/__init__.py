"""The HTTP API: `create_app(test_config)` builds a Flask app on the job store and the Celery queue.

The layers, top to bottom: a blueprint per surface (native jobs, batches, OpenAI, Workers AI, health,
metrics, docs, playground) turns its request into the engine's GenerationRequest once
(api/generation.py) and calls the service layer (api/service/), which alone talks to the queue
(tasks/). Errors from anywhere are rendered by one table in each surface's envelope (api/errors.py).
Nothing here imports the engine runtime: the API process never loads CTranslate2.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import redis
from flask import Flask

import config
from api.service.batches import BatchService
from api.service.files import FileService
from api.service.jobs import JobService
from api.service.models import ModelService
from tasks.runtime.app import create_celery
from tasks.runtime.submission import batch_store
from tasks.store.files import FileStore
from tasks.store.jobs import JobStore
from tasks.store.registry import WorkerRegistry
from tasks.store.tokenizers import TokenizerFiles

POOL_WAIT_S = 30  # a request waits this long for a free Redis connection (a burst takes turns), then 503


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(config.DEFAULTS)
    app.config.from_prefixed_env(config.ENV_PREFIX.rstrip("_"))
    if test_config:
        app.config.from_mapping(test_config)
    config.resolve_secrets(app.config)
    app.config["MAX_CONTENT_LENGTH"] = app.config["MAX_REQUEST_BYTES"]
    app.json.sort_keys = False
    app.logger.setLevel(logging.INFO)
    init_services(app)

    from api import (
        auth,
        batches,
        errors,
        health,
        jobs,
        metrics,
        openapi,
        playground,
        request_id,
        security,
        waiting,
        workers_ai,
    )
    from api.openai import files as openai_files
    from api.openai import routes as openai

    errors.register_error_handlers(app)
    waiting.init_app(app)
    request_id.init_app(app)
    auth.init_app(app)
    security.init_app(app)
    blueprints = (jobs.bp, batches.bp, health.bp, playground.bp, workers_ai.bp, openapi.bp, openai.bp, openai_files.bp)
    for blueprint in blueprints:
        app.register_blueprint(blueprint)
    metrics.init_app(app)
    return app


def init_services(app: Flask) -> None:
    """One store, registry and Celery app per Flask app, and the services built on them."""
    settings = app.config
    store = JobStore(redis_client(settings), settings["JOB_TTL_S"])
    registry = WorkerRegistry(store.redis)
    celery = create_celery(settings)
    models = ModelService(registry, str(settings["MODEL"]), TokenizerFiles(store.redis))
    app.extensions["genqueue.models"] = models
    app.extensions["genqueue.jobs"] = JobService(store, registry, models, celery, settings)
    batches = BatchService(batch_store(store, settings), celery, settings)
    app.extensions["genqueue.batches"] = batches
    app.extensions["genqueue.files"] = FileService(FileStore(store, settings["BATCH_TTL_S"]), batches, settings)


def redis_client(settings: Mapping[str, Any]) -> redis.Redis:
    """The API process's Redis client, on a pool of at most API_REDIS_CONNECTIONS: however many clients
    wait, requests take turns on these (the job events subscription is one more, tasks/store/followers.py)."""
    pool = redis.BlockingConnectionPool.from_url(
        settings["REDIS_URL"],
        max_connections=int(settings["API_REDIS_CONNECTIONS"]),
        timeout=POOL_WAIT_S,
        decode_responses=True,
        health_check_interval=30,
    )
    return redis.Redis(connection_pool=pool)
