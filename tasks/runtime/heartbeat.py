"""A worker's heartbeat: its registry entry, renewed every HEARTBEAT_INTERVAL_S from a thread."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable

import redis

from tasks.store.registry import HEARTBEAT_INTERVAL_S, HEARTBEAT_TTL_S, WorkerInfo, WorkerRegistry

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(
        self,
        registry: WorkerRegistry,
        info: WorkerInfo,
        running: Callable[[], int] = lambda: 0,
        interval_s: float = HEARTBEAT_INTERVAL_S,
        ttl_s: float = HEARTBEAT_TTL_S,
    ):
        self.registry = registry
        self.info = info
        self.running = running  # how many jobs the worker runs now, read at each beat
        self.interval_s, self.ttl_s = interval_s, ttl_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Heartbeat:
        self._stop.clear()
        self.beat()  # announced before start returns: readiness checks see the worker at once
        self._thread = threading.Thread(target=self._loop, name="genqueue-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating and leave the registry now (not after the entry's TTL)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval_s + 5)
        try:
            self.registry.remove(self.info.id)
        except redis.RedisError as exc:
            log.warning("could not leave the worker registry: %s", exc)

    def beat(self) -> None:
        try:
            self.registry.beat(dataclasses.replace(self.info, running=self.running()), self.ttl_s)
        except redis.RedisError as exc:
            log.warning("heartbeat failed: %s", exc)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()
