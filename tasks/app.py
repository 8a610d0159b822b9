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
from tasks import keys

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
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    app.conf.genqueue = dict(settings)
    return app


celery_app = create_celery()


def enqueue(app: Celery, job_id: str, queue: str) -> None:
    app.send_task(GENERATE_TASK, args=[job_id], queue=queue)


def queue_depth(client, queue: str) -> int:
    """Jobs waiting in a queue: the lengths of its broker lists (a job a worker took is not counted)."""
    with client.pipeline(transaction=False) as pipe:
        for key in keys.broker_queue_lists(queue):
            pipe.llen(key)
        return sum(pipe.execute())
