"""kombu's Redis transport, made to survive losing Redis while it holds unacknowledged jobs.

When the broker connection drops, Celery closes the channel, and kombu 5.7 then tries to put the
worker's unacknowledged messages back on their queues through a connection it has already let go:
an AttributeError that kills the worker ("Unrecoverable error"), so it never comes back when Redis
does. Those messages are safe where they are (Redis keeps them in its unacked hash, and any worker
restores them after the visibility timeout), so a failed restore is logged and the worker lives on.
"""

from __future__ import annotations

import logging

from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)


class QoS(kombu_redis.QoS):
    def restore_unacked_once(self, stderr=None):
        try:
            return super().restore_unacked_once(stderr)
        except (AttributeError, *kombu_redis.Transport.connection_errors) as exc:
            log.warning(
                "could not requeue unacknowledged jobs now (%s); they come back after the visibility timeout", exc
            )
            return None


class Channel(kombu_redis.Channel):
    QoS = QoS


class Transport(kombu_redis.Transport):
    Channel = Channel
