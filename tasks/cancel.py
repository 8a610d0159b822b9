"""Hears job cancellations in a worker process, so a running job stops within a few tokens.

The API publishes a cancelled job's id on one channel; each worker keeps the ids of its own running
jobs that were cancelled. A job also rereads its cancel flag every CANCEL_POLL_S, which covers a
cancellation published while this listener was reconnecting.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from tasks import keys

log = logging.getLogger(__name__)

CANCEL_POLL_S = 1.0
RECONNECT_DELAY_S = 1.0


class CancelWatcher:
    def __init__(self, client: redis.Redis):
        self._client = client
        self._running: set[str] = set()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._listen, name="genqueue-cancel", daemon=True).start()

    def watch(self, job_id: str) -> None:
        with self._lock:
            self._running.add(job_id)

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._running.discard(job_id)
            self._cancelled.discard(job_id)

    def is_cancelled(self, job_id: str) -> bool:
        return job_id in self._cancelled

    def _listen(self) -> None:
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(keys.CANCEL_CHANNEL)
                for message in pubsub.listen():
                    job_id = message["data"]
                    job_id = job_id.decode() if isinstance(job_id, bytes) else job_id
                    with self._lock:
                        if job_id in self._running:
                            self._cancelled.add(job_id)
            except redis.RedisError as exc:
                log.warning("cancel listener lost Redis (%s); reconnecting", exc)
                time.sleep(RECONNECT_DELAY_S)
            finally:
                pubsub.close()
