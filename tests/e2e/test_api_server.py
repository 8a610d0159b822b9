"""`genqueue api` as it runs in production (gunicorn, started by genqueue/launcher.py ApiProcess):
the address it binds, and streams that outlive gunicorn's worker --timeout.

Only loopback traffic is allowed here, so where the API listens is read from the kernel's socket
table (/proc/net/tcp), never by connecting to another address."""

from __future__ import annotations

import json
import socket
import struct
import time
import urllib.request
from pathlib import Path

import pytest

from api.auth import hash_key
from genqueue.launcher import ApiProcess
from tests.conftest import REPO, STORE_DB, redis_url

LISTEN = "0A"  # the TCP state of a listening socket in /proc/net/tcp
GUNICORN_TIMEOUT_S = 2


def listening_addresses(port: int) -> set[str]:
    """The IPv4 addresses with a socket listening on port, from /proc/net/tcp."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == LISTEN and int(port_hex, 16) == port:
            found.add(socket.inet_ntoa(struct.pack("<I", int(address, 16))))
    return found


def start_api(tmp_path, **settings) -> ApiProcess:
    # No worker serves STORE_DB: the refusal of jobs for a queue no worker serves is off.
    settings = {
        "redis_url": redis_url(STORE_DB),
        "api_keys": "",
        "api_keys_file": "",
        "no_worker_grace_s": 0,
        **settings,
    }
    return ApiProcess(settings, log_dir=tmp_path, cwd=REPO).wait_ready()


@pytest.mark.parametrize(
    "settings, address",
    [
        ({"host": "0.0.0.0"}, "127.0.0.1"),  # open (no keys): loopback only, whatever the host asked
        ({"host": "0.0.0.0", "open_api_any_host": "true"}, "0.0.0.0"),  # unless told otherwise
        ({"host": "0.0.0.0", "api_keys": f"team:{hash_key('gq_bind-test')}"}, "0.0.0.0"),  # keys: as asked
    ],
    ids=["open", "open-any-host", "keyed"],
)
def test_an_api_without_keys_binds_loopback_unless_open_api_any_host(tmp_path, settings, address):
    api = start_api(tmp_path, **settings)
    try:
        assert listening_addresses(api.settings["port"]) == {address}
        said = "the API is open, so it listens on 127.0.0.1 only" in api.output()
        assert said == ("api_keys" not in settings and address == "127.0.0.1")
    finally:
        api.stop()


def test_a_stream_outlives_the_gunicorn_timeout_while_the_api_keeps_answering(tmp_path, monkeypatch):
    # gunicorn kills a worker that has not told it it is alive within --timeout; a worker that blocked
    # on one stream would be killed mid-stream. No worker consumes this database's queue: the stream
    # has nothing to send but keep-alives, for three timeouts.
    monkeypatch.setenv("GUNICORN_CMD_ARGS", f"--timeout {GUNICORN_TIMEOUT_S} --log-level debug")
    api = start_api(tmp_path, sse_keepalive_s=0.5)
    try:
        assert f"  timeout: {GUNICORN_TIMEOUT_S}\n" in api.output()  # the timeout given here is in force
        request = urllib.request.Request(
            f"{api.url}/v1/jobs",
            json.dumps({"prompt": "wait", "stream": True}).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as stream:
            started = time.monotonic()
            while time.monotonic() - started < 3 * GUNICORN_TIMEOUT_S:
                assert stream.readline() in (b": keep-alive\n", b"\n")
                assert api.answers("/healthz")  # the same process answers meanwhile
            cancel = urllib.request.Request(f"{api.url}/v1/jobs/{stream.headers['X-Job-Id']}", method="DELETE")
            assert urllib.request.urlopen(cancel, timeout=10).status == 200
            assert stream.read().rstrip().endswith(b"data: [DONE]")  # the stream was never cut
        assert "WORKER TIMEOUT" not in api.output()
    finally:
        api.stop()
