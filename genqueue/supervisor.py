"""`genqueue run`'s children: a worker, the API (and a webhook worker when webhooks are configured),
started, announced when ready, kept running, and stopped together.

A child that exits on its own (a crash, a kill -9) is started again after a backoff (RESTART_BASE_S,
doubling with each recent crash up to RESTART_MAX_S), with a line saying so, while the others keep
serving. Only a crash loop (RUN_CRASH_LOOP_CRASHES crashes of one child within RUN_CRASH_LOOP_WINDOW_S)
stops everything, with a message saying which child and why; Ctrl-C (SIGINT) or SIGTERM stops all.
"""

from __future__ import annotations

import resource
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import click

from genqueue.launcher import ApiProcess, Process, WebhookWorkerProcess, WorkerProcess

READY_TIMEOUT_S = 300
POLL_S = 0.5
RESTART_BASE_S = 0.5  # the wait before a crashed child's first restart; doubled for each recent crash
RESTART_MAX_S = 10.0
# Each waiting client holds a socket, a file: below this hard limit, say how many the API can hold.
LOW_OPEN_FILES = 8192


@dataclass
class Child:
    """One supervised child: how to start it, the process now, and when it crashed lately."""

    name: str
    start: Callable[[], Process]
    process: Process | None = None
    crashes: deque[float] = field(default_factory=deque)
    restart_at: float | None = None  # set while it waits to be started again


class CrashLoop(click.ClickException):
    pass


class Supervisor:
    def __init__(
        self,
        settings: Mapping[str, Any],
        children: Sequence[Child] | None = None,
        ready: Callable[[], bool] | None = None,
    ):
        """`children` and `ready` (when to print the banner) default to `genqueue run`'s own."""
        self.settings = settings
        self.url = f"http://{settings['HOST']}:{settings['PORT']}"
        self.stopping = False
        self.loop_crashes = int(settings["RUN_CRASH_LOOP_CRASHES"])
        self.loop_window_s = float(settings["RUN_CRASH_LOOP_WINDOW_S"])
        self.children = list(children) if children is not None else self._stack()
        self.ready = ready or self._api_ready

    def _stack(self) -> list[Child]:
        children = [Child("worker", lambda: WorkerProcess({}, wait=False, inherit_output=True))]
        if self.settings.get("WEBHOOK_SECRET"):  # webhooks are refused at submit without a secret
            children.append(Child("webhooks", lambda: WebhookWorkerProcess({}, wait=False, inherit_output=True)))
        api_settings = {"host": self.settings["HOST"], "port": self.settings["PORT"]}
        children.append(Child("api", lambda: ApiProcess(api_settings, inherit_output=True)))
        return children

    def _api_ready(self) -> bool:
        api = next((child.process for child in self.children if child.name == "api"), None)
        return isinstance(api, ApiProcess) and api.answers("/readyz")

    def run(self) -> None:
        raise_open_files_limit()
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGTERM, self._stop)
        try:
            for child in self.children:
                self._start(child)
            self._watch()
        finally:
            for child in self.children:
                if child.process is not None:
                    child.process.stop()

    def _stop(self, *_args) -> None:
        self.stopping = True

    def _start(self, child: Child) -> None:
        child.process, child.restart_at = child.start(), None
        say(f"{child.name} started (pid {child.process.pid})")

    def _watch(self) -> None:
        announced = False
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.stopping:
            for child in self.children:
                self._look_after(child)
            if not announced and self.ready():
                announced = True
                click.echo(banner(self.url))
            elif not announced and time.monotonic() > deadline:
                click.echo(f"still not ready after {READY_TIMEOUT_S}s; see {self.url}/readyz", err=True)
                deadline = float("inf")
            time.sleep(POLL_S)

    def _look_after(self, child: Child) -> None:
        """Restart a child that is due again; note one that has just exited, or give up on a crash loop."""
        now = time.monotonic()
        if child.restart_at is not None:
            if now >= child.restart_at and not self.stopping:
                self._start(child)
            return
        if child.process is None or child.process.alive() or self.stopping:
            return
        code = child.process.process.returncode
        child.crashes.append(now)
        while child.crashes and child.crashes[0] < now - self.loop_window_s:
            child.crashes.popleft()
        if len(child.crashes) >= self.loop_crashes:
            raise CrashLoop(
                f"the {child.name} exited {len(child.crashes)} times within {self.loop_window_s:g} s (last exit code "
                f"{code}): a crash loop (GENQUEUE_RUN_CRASH_LOOP_CRASHES, _WINDOW_S); stopped everything"
            )
        wait_s = min(RESTART_MAX_S, RESTART_BASE_S * 2 ** (len(child.crashes) - 1))
        child.restart_at = now + wait_s
        say(f"{child.name} (pid {child.process.pid}) exited with code {code}; restarting it in {wait_s:g} s")


def say(line: str) -> None:
    click.echo(f"genqueue run: {line}", err=True)


def raise_open_files_limit() -> None:
    """Raise this process's open-files soft limit to its hard limit (the children inherit it), and say
    so when the hard limit is low: each client the API holds is an open socket."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, 1 << 20) if hard == resource.RLIM_INFINITY else hard  # 2^20: Linux's default nr_open
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # past the kernel's nr_open: keep what we have
            pass
    if soft < LOW_OPEN_FILES:
        click.echo(
            f"open files are limited to {soft} (hard limit {hard}): the API holds at most about {soft - 100} "
            "clients at once; raise the hard limit (ulimit -Hn, LimitNOFILE=, docker --ulimit nofile) for more",
            err=True,
        )


def banner(url: str) -> str:
    return (
        f"\ngenqueue is ready at {url}  (Ctrl-C stops it)\n"
        f"  playground: {url}/\n\n"
        f"  curl -sN {url}/v1/jobs -H 'Content-Type: application/json' \\\n"
        f'       -d \'{{"prompt": "What is the capital of France?", "stream": true}}\'\n'
    )
