"""Runs the bookkeeping that the engine's thread triggers (metrics) on a thread of its own.

The engine's callbacks hand a call over and go on with the next token, so the engine never waits
for Redis: a slow or paused Redis delays the figures, never the generation. Calls run in the order
handed over. Should Redis stall so long that MAX_PENDING calls pile up, later ones are dropped and
logged: a figure is lost, never a token delayed (recording never fails a job either way).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

MAX_PENDING = 10_000
STOP_TIMEOUT_S = 10.0


class Offload:
    def __init__(self, max_pending: int = MAX_PENDING):
        self._calls: queue.Queue[tuple[Callable[..., Any], tuple] | None] = queue.Queue(max_pending)
        self._thread: threading.Thread | None = None

    def start(self) -> Offload:
        self._thread = threading.Thread(target=self._loop, name="genqueue-offload", daemon=True)
        self._thread.start()
        return self

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run fn(*args) on the offload thread; returns at once."""
        try:
            self._calls.put_nowait((fn, args))
        except queue.Full:
            log.warning("dropped %s: %d calls already wait for Redis", getattr(fn, "__name__", fn), self._calls.maxsize)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Run what was handed over, then end the thread."""
        if self._thread is None:
            return
        try:
            self._calls.put(None, timeout=timeout_s)
        except queue.Full:
            return
        self._thread.join(timeout_s)

    def _loop(self) -> None:
        while (item := self._calls.get()) is not None:
            fn, args = item
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - bookkeeping never ends the thread that does it
                log.exception("offloaded %s failed", getattr(fn, "__name__", fn))
