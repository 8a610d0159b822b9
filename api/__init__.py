"""The HTTP API: `create_app(test_config)` builds a Flask app on the job store and the Celery queue."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask

from genqueue import config
from tasks.app import create_celery
from tasks.store import JobStore


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(config.DEFAULTS)
    app.config.from_prefixed_env(config.ENV_PREFIX.rstrip("_"))
    if test_config:
        app.config.from_mapping(test_config)
    app.config["MAX_CONTENT_LENGTH"] = app.config["MAX_REQUEST_BYTES"]
    app.json.sort_keys = False
    app.logger.setLevel(logging.INFO)

    app.extensions["genqueue.store"] = JobStore.from_url(app.config["REDIS_URL"], app.config["JOB_TTL_S"])
    app.extensions["genqueue.celery"] = create_celery(app.config)

    from api import auth, batches, errors, health, jobs, metrics, openai, openapi, playground, request_id, workers_ai

    errors.register_error_handlers(app)
    request_id.init_app(app)
    auth.init_app(app)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(playground.bp)
    app.register_blueprint(workers_ai.bp)
    app.register_blueprint(openapi.bp)
    app.register_blueprint(openai.bp)
    metrics.init_app(app)
    batches.init_app(app)
    return app
