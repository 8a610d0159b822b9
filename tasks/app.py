"""The Celery app: Redis as broker and result backend, JSON only, one queue per device kind.

The API imports this module to enqueue by task name; only workers import tasks.worker (and with
it the engine), so the API process never loads a model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from celery import Celery
from kombu import Queue
from kombu.entity import PERSISTENT_DELIVERY_MODE
from kombu.utils.uuid import uuid

from genqueue import config

GENERATE_TASK = "genqueue.generate"
BATCH_QUEUE_SUFFIX = ".batch"
PUBLISH_CHUNK = 1000  # messages per pipelined round trip when enqueueing many


def batch_queue(queue: str) -> str:
    """The lower-priority queue of a device's batch items: workers take from it only when `queue` is empty."""
    return queue + BATCH_QUEUE_SUFFIX


def consumed_queues(queues: list[str]) -> list[str]:
    """What a worker of these queues consumes, in priority order: every interactive queue, then their batch queues."""
    return list(queues) + [batch_queue(name) for name in queues]


def transport_options(settings: Mapping[str, Any]) -> dict[str, Any]:
    visibility_timeout = int(settings["VISIBILITY_TIMEOUT_S"])
    return {
        # A worker polls its queues in the order it was given (interactive first), not round robin, so
        # a batch never delays an interactive job by more than the slot it is waiting for.
        "queue_order_strategy": "priority",
        "visibility_timeout": visibility_timeout,
        # Look for jobs of dead workers every REDELIVERY_CHECK_S (kombu's default scans every 100 s).
        "unacked_restore_interval": settings["REDELIVERY_CHECK_S"],
        "unacked_restore_throttle": 1,
        "socket_timeout": 5,
        "socket_connect_timeout": 2,
    }


def create_celery(settings: Mapping[str, Any] | None = None) -> Celery:
    settings = config.load() if settings is None else settings
    app = Celery("genqueue", broker=settings["REDIS_URL"], backend=settings["REDIS_URL"], include=["tasks.worker"])
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],  # never pickle: a message can only carry data, not code
        result_accept_content=["json"],
        task_queues=[Queue(name) for name in consumed_queues(list(config.QUEUES))],
        task_default_queue=settings["DEFAULT_QUEUE"],
        task_ignore_result=True,  # results live in the job store, not in Celery's backend
        # A job is acknowledged when it ends, so a worker that dies mid-job leaves it to another.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport="tasks.transport:Transport",  # kombu's Redis transport, surviving a Redis outage
        broker_transport_options=transport_options(settings),
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
    # ignore_result: the API does not know the task, so send_task would otherwise subscribe to its
    # result in the backend, a round trip per job for a result that is never stored.
    app.send_task(GENERATE_TASK, args=[job_id], queue=queue, ignore_result=True)


def enqueue_many(app: Celery, job_ids: Iterable[str], queue: str) -> int:
    """Enqueue many jobs with pipelined writes: one round trip per PUBLISH_CHUNK messages (kombu's
    publish batch) instead of two per message. Each message is the one send_task would send, built
    by Celery's own protocol-2 builder and published to the queue directly: send_task's per-call
    routing and option handling cost twice as much as the rest (bench/batch_submit.py).
    Returns how many were sent."""
    sent = 0
    with app.producer_or_acquire() as producer:
        producer.maybe_declare(app.amqp.queues[queue])
        with producer.batch(max_size=PUBLISH_CHUNK):
            for job_id in job_ids:
                args = [job_id]
                headers, properties, body, _sent_event = app.amqp.as_task_v2(
                    uuid(),
                    GENERATE_TASK,
                    args=args,
                    kwargs={},
                    argsrepr=repr(args),
                    kwargsrepr="{}",
                    ignore_result=True,
                )
                producer.publish(
                    body,
                    exchange="",  # the default exchange: the routing key names the queue, as send_task does
                    routing_key=queue,
                    serializer="json",
                    headers=headers,
                    delivery_mode=PERSISTENT_DELIVERY_MODE,
                    retry=False,
                    declare=[],
                    **properties,
                )
                sent += 1
    return sent
