"""kombu's Redis transport, made to survive losing Redis while it holds unacknowledged jobs.

When the broker connection drops, Celery closes the channel, and kombu 5.7 then tries to put the
worker's unacknowledged messages back on their queues through a connection it has already let go:
an AttributeError that kills the worker ("Unrecoverable error"), so it never comes back when Redis
does. Those messages are safe where they are (Redis keeps them in its unacked hash, and any worker
restores them after the visibility timeout), so a failed restore is logged and the worker lives on.
The same holds for a job that ends after the outage: its message cannot be acknowledged on the
closed channel, and comes back (to be dropped as ended) after the visibility timeout.
"""

from __future__ import annotations

import logging

from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)


class QoS(kombu_redis.QoS):
    def ack(self, delivery_tag):
        # A job that ends after its channel was closed (Redis went away meanwhile) cannot be
        # acknowledged there: kombu would raise an AttributeError that kills the worker. Its message
        # stays in the unacked hash and comes back after the visibility timeout; its job has ended by
        # then, so the worker that takes it runs nothing and acknowledges it.
        if self.channel.connection is None:
            log.warning("job message %s not acknowledged: its channel closed in a Redis outage", delivery_tag)
            return
        super().ack(delivery_tag)

    def reject(self, delivery_tag, requeue=False):
        if self.channel.connection is None:  # as in ack: the message comes back after the visibility timeout
            log.warning("job message %s not rejected: its channel closed in a Redis outage", delivery_tag)
            return
        super().reject(delivery_tag, requeue)

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
