"""The Celery app: Redis as broker and result backend, JSON only, one queue per device kind.

Each process builds its own app from its settings (`create_celery`): the API's builds the messages of
its jobs by task name (`task_message`; the job store pushes them), a worker's registers the task
(tasks/runtime/worker.py `install`). Only workers import the worker module (and with it the engine),
so the API process never loads a model.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

from celery import Celery
from kombu import Queue, serialization
from kombu.entity import PERSISTENT_DELIVERY_MODE
from kombu.utils.json import dumps as json_dumps
from kombu.utils.uuid import uuid

import config
from tasks.store import keys

GENERATE_TASK = "genqueue.generate"
WEBHOOK_TASK = "genqueue.webhook"
WEBHOOKS_QUEUE = "webhooks"  # consumed by webhook workers alone (tasks/runtime/webhooks.py), never by model workers
BATCH_QUEUE_SUFFIX = ".batch"


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
        # kombu's own names, said here so the recovery sweep reads the same keys (tasks/store/deliveries.py)
        "unacked_key": keys.BROKER_UNACKED,
        "unacked_index_key": keys.BROKER_UNACKED_INDEX,
        "socket_timeout": 5,
        "socket_connect_timeout": 2,
    }


def create_celery(settings: Mapping[str, Any] | None = None) -> Celery:
    settings = config.load() if settings is None else settings
    app = Celery("genqueue", broker=settings["REDIS_URL"], backend=settings["REDIS_URL"])
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],  # never pickle: a message can only carry data, not code
        result_accept_content=["json"],
        task_queues=[Queue(name) for name in [*consumed_queues(list(config.QUEUES)), WEBHOOKS_QUEUE]],
        task_default_queue=settings["DEFAULT_QUEUE"],
        task_ignore_result=True,  # results live in the job store, not in Celery's backend
        # A job is acknowledged when it ends, so a worker that dies mid-job leaves it to another.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=int(settings["PREFETCH_MULTIPLIER"]),
        broker_transport="tasks.runtime.transport:Transport",  # kombu's Redis transport, surviving a Redis outage
        broker_transport_options=transport_options(settings),
        # Workers wait for Redis as long as it takes; the API gives up fast and answers 503.
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
        worker_hijack_root_logger=False,
    )
    app.conf.genqueue = dict(settings)
    return app


def task_message(app: Celery, job_id: str, queue: str) -> str:
    """The message that queues job_id, as the JSON kombu's Redis transport pushes onto the queue's list
    (tasks/store/keys.py broker_queue), so the job store can push it in the same atomic step that writes
    the job (tasks/store/jobs.py submit): a crash cannot store a job without queueing it. Celery's own
    protocol-2 builder makes the task's headers and body; the envelope is kombu's (Producer.publish,
    then the virtual channel's prepare_message and basic_publish on the default exchange, whose routing
    key names the queue); tests/tasks/test_task_message.py checks it against kombu's own."""
    args = [job_id]
    headers, properties, body, _sent_event = app.amqp.as_task_v2(
        uuid(), GENERATE_TASK, args=args, kwargs={}, argsrepr=repr(args), kwargsrepr="{}", ignore_result=True
    )
    content_type, content_encoding, payload = serialization.dumps(body, serializer="json")
    envelope = {
        "body": base64.b64encode(payload.encode()).decode(),  # the transport's body_encoding, base64
        "content-encoding": content_encoding,
        "content-type": content_type,
        "headers": headers,
        "properties": {
            **properties,
            "delivery_mode": PERSISTENT_DELIVERY_MODE,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,  # the default: the list named by the queue itself, not a priority list
            "body_encoding": "base64",
            "delivery_tag": uuid(),
        },
    }
    return json_dumps(envelope)


def job_of_message(message: Mapping[str, Any]) -> str | None:
    """The job id a generation task's message carries (as task_message builds it, or Celery for a
    retry); None for any other message."""
    try:
        if message["headers"]["task"] != GENERATE_TASK:
            return None
        args = json.loads(base64.b64decode(message["body"]))[0]
        return str(args[0])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
