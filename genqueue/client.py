"""A small client of the HTTP jobs API, for the CLI: submit, read, and stream a job's text as it comes.

Standard library only (urllib), so the client commands need nothing the server does not.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

STREAM_IDLE_TIMEOUT_S = 120


class ApiClientError(Exception):
    """Raised when the API cannot be reached or answers with an error."""


class JobsClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 30):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s

    def submit(self, body: dict) -> dict:
        """Queue a job; the job as the API answers it (status queued)."""
        with self._open("POST", "/v1/jobs", body) as response:
            return json.load(response)

    def get(self, job_id: str, wait_s: float = 0) -> dict:
        path = f"/v1/jobs/{urllib.request.quote(job_id, safe='')}" + (f"?wait={wait_s:g}" if wait_s else "")
        with self._open("GET", path, timeout_s=self.timeout_s + wait_s) as response:
            return json.load(response)

    def wait(self, job_id: str, wait_s: float = 60) -> dict:
        """The job once it has ended, asking again every wait_s seconds."""
        while True:
            job = self.get(job_id, wait_s)
            if job["status"] not in ("queued", "running"):
                return job

    def stream(self, body: dict) -> Iterator[tuple[str, dict]]:
        """Submit with stream=true and yield (event name, data) as each Server-Sent Event arrives.

        The first item is ("job", {"id": ...}); chunks are ("message", {"response": ...}); a failure is
        ("error", {"error": ...}). Ends at [DONE].
        """
        # The server sends a keep-alive comment every 15 s while a job waits: a longer silence is a fault.
        response = self._open("POST", "/v1/jobs", {**body, "stream": True}, timeout_s=STREAM_IDLE_TIMEOUT_S)
        with response:
            yield "job", {"id": response.headers.get("X-Job-Id")}
            name, data = "message", []
            for raw in response:  # one line at a time, as the server flushes them
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.startswith("event:"):
                    name = line.partition(":")[2].strip()
                elif line.startswith("data:"):
                    data.append(line.partition(":")[2].removeprefix(" "))
                elif not line and data:
                    payload = "\n".join(data)
                    if payload == "[DONE]":
                        return
                    yield name, json.loads(payload)
                    name, data = "message", []

    def _open(self, method: str, path: str, body: dict | None = None, timeout_s: float | None = -1):
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout_s if timeout_s == -1 else timeout_s)
        except urllib.error.HTTPError as exc:
            raise ApiClientError(_error_message(exc)) from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiClientError(f"cannot reach the genqueue API at {self.base_url}: {reason}") from exc


def _error_message(exc: urllib.error.HTTPError) -> str:
    """The API's JSON error as one line: status, code, message and the fields at fault."""
    try:
        error = json.load(exc)["error"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {exc.code} {exc.reason}"
    fields = error.get("fields") or {}
    details = "; ".join(f"{name}: {_problems(problems)}" for name, problems in fields.items())
    return f"HTTP {exc.code} {error.get('code')}: {error.get('message')}" + (f" ({details})" if details else "")


def _problems(problems) -> str:
    if isinstance(problems, list) and all(isinstance(p, str) for p in problems):
        return " ".join(problems)
    return json.dumps(problems)
