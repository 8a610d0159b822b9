"""The Celery app: Redis as broker and result backend, JSON only, one queue per device kind.

The API imports this module to enqueue by task name; only workers import tasks.worker (and with
it the engine), so the API process never loads a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from celery import Celery
from kombu import Queue

from genqueue import config

GENERATE_TASK = "genqueue.generate"


def create_celery(settings: Mapping[str, Any] | None = None) -> Celery:
    settings = config.load() if settings is None else settings
    app = Celery("genqueue", broker=settings["REDIS_URL"], backend=settings["REDIS_URL"], include=["tasks.worker"])
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],  # never pickle: a message can only carry data, not code
        result_accept_content=["json"],
        task_queues=[Queue(name) for name in config.QUEUES],
        task_default_queue=settings["DEFAULT_QUEUE"],
        task_ignore_result=True,  # results live in the job store, not in Celery's backend
        # A job is acknowledged when it ends, so a worker that dies mid-job leaves it to another.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": settings["VISIBILITY_TIMEOUT_S"],
            # Look for jobs of dead workers every REDELIVERY_CHECK_S (kombu's default scans every 100 s).
            "unacked_restore_interval": settings["REDELIVERY_CHECK_S"],
            "unacked_restore_throttle": 1,
            "socket_timeout": 5,
            "socket_connect_timeout": 2,
        },
        # Workers wait for Redis as long as it takes; the API gives up fast and answers 503.
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
        worker_hijack_root_logger=False,
    )
    app.conf.genqueue = dict(settings)
    return app


celery_app = create_celery()


def enqueue(app: Celery, job_id: str, queue: str) -> None:
    app.send_task(GENERATE_TASK, args=[job_id], queue=queue)
