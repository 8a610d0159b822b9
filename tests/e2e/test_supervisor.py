"""`genqueue run`'s supervisor with real child processes killed with SIGKILL: a crashed child is started
again while the others keep running; a crash loop, or SIGTERM, stops everything."""

import os
import re
import signal
import subprocess
import sys
import time

from tests.conftest import REPO

# A supervisor of two long sleepers, "alpha" and "beta", as `genqueue run` supervises its worker and API.
SUPERVISED = """
import sys
import config
from genqueue.launcher import Process
from genqueue.supervisor import Child, Supervisor

SLEEP = [sys.executable, "-c", "import time; time.sleep(600)"]

def sleeper(name):
    return Child(name, lambda: Process(name, SLEEP, inherit_output=True))

settings = config.load(RUN_CRASH_LOOP_CRASHES=int(sys.argv[1]), RUN_CRASH_LOOP_WINDOW_S=60)
Supervisor(settings, [sleeper("alpha"), sleeper("beta")], ready=lambda: True).run()
"""
STARTED = re.compile(r"genqueue run: (\w+) started \(pid (\d+)\)")


class Supervised:
    def __init__(self, crash_loop: int):
        self.process = subprocess.Popen(
            [sys.executable, "-c", SUPERVISED, str(crash_loop)], cwd=REPO, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self.pids: dict[str, int] = {}

    def read_until(self, pattern: str, timeout_s: float = 30) -> str:
        """Read the supervisor's log lines until one matches; each start updates `pids`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            assert line, f"the supervisor exited; it said:\n{''.join(self.lines)}"
            self.lines.append(line)
            if started := STARTED.search(line):
                self.pids[started[1]] = int(started[2])
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no line matching {pattern!r}:\n{''.join(self.lines)}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"  # a zombie has exited


def test_a_killed_child_is_restarted_and_the_others_keep_running_until_sigterm():
    supervisor = Supervised(crash_loop=5)
    supervisor.read_until(r"beta started")
    alpha, beta = supervisor.pids["alpha"], supervisor.pids["beta"]
    os.kill(alpha, signal.SIGKILL)
    assert "alpha (pid" in supervisor.read_until(r"alpha .* exited with code -9; restarting it in")
    supervisor.read_until(r"alpha started")
    assert supervisor.pids["alpha"] != alpha and alive(supervisor.pids["alpha"])
    assert supervisor.pids["beta"] == beta and alive(beta)  # never touched
    supervisor.process.send_signal(signal.SIGTERM)
    assert supervisor.process.wait(timeout=30) == 0  # asked to stop: not a failure
    assert not alive(supervisor.pids["alpha"]) and not alive(beta)


def test_a_crash_loop_stops_everything_with_a_clear_message():
    supervisor = Supervised(crash_loop=3)
    supervisor.read_until(r"beta started")
    beta = supervisor.pids["beta"]
    for crash in range(3):
        if crash:
            supervisor.read_until(r"alpha started")
        os.kill(supervisor.pids["alpha"], signal.SIGKILL)
        if crash < 2:
            supervisor.read_until(r"alpha .* restarting it in")
    rest = supervisor.process.communicate(timeout=30)[1]
    assert supervisor.process.returncode == 1
    assert "the alpha exited 3 times within 60 s" in rest and "crash loop" in rest and "stopped everything" in rest
    assert not alive(beta)  # the others were stopped with it
