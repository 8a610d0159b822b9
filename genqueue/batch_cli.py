"""`genqueue batch ...`: submit a JSONL file as a batch, follow it with a progress bar, get its results.

A client of the HTTP API (GENQUEUE_API_URL, GENQUEUE_API_KEY); it imports nothing of the server.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import click

from genqueue import config

ENDED = ("completed", "failed", "cancelled")
CHUNK_BYTES = 1 << 16


class Api:
    def __init__(self, url: str | None, key: str | None):
        settings = config.load()
        host = settings["HOST"] if settings["HOST"] not in ("0.0.0.0", "::") else "127.0.0.1"
        self.url = (url or settings["API_URL"] or f"http://{host}:{settings['PORT']}").rstrip("/")
        self.key = key or settings["API_KEY"]

    def open(self, method: str, path: str, body: Any = None, headers: dict | None = None, timeout: float = 60):
        """The response to a request; an error answer becomes a ClickException with its message."""
        headers = dict(headers or {})
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        if isinstance(body, dict):
            body = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            raise click.ClickException(describe_error(exc)) from None
        except urllib.error.URLError as exc:
            raise click.ClickException(f"cannot reach the API at {self.url}: {exc.reason}") from None

    def json(self, method: str, path: str, body: Any = None, **kwargs) -> dict:
        with self.open(method, path, body, **kwargs) as response:
            return json.load(response)


def describe_error(exc: urllib.error.HTTPError) -> str:
    try:
        error = json.load(exc)["error"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {exc.code}"
    text = f"{error['message']} ({exc.code} {error['code']})"
    for field, problems in list(flatten(error.get("fields") or {}))[:20]:
        text += f"\n  {field}: {' '.join(problems)}"
    return text


def flatten(fields: dict, prefix: str = ""):
    for name, problems in fields.items():
        if isinstance(problems, dict):
            yield from flatten(problems, f"{prefix}{name}.")
        else:
            yield prefix + name, [str(p) for p in problems]


def api_options(command):
    command = click.option("--api-key", help="API key [env GENQUEUE_API_KEY].")(command)
    return click.option("--url", help="API address [env GENQUEUE_API_URL, default http://HOST:PORT].")(command)


@click.group("batch")
def batch() -> None:
    """Run many requests as one batch: submit, follow, results, cancel."""


@batch.command("submit")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--wait", is_flag=True, help="Follow the batch with a progress bar until it ends.")
@click.option("--metadata", "-m", multiple=True, metavar="KEY=VALUE", help="Label the batch (repeatable).")
@click.option("--poll", default=1.0, show_default=True, help="Seconds between progress updates.")
@api_options
def submit(file: Path, wait: bool, metadata: tuple[str, ...], poll: float, url: str | None, api_key: str | None):
    """Submit FILE, one {"custom_id", "body": {...job request}} a line, as a batch; print its id.

    With --wait, show done/total, tokens/s and the time left until it ends, then print the batch;
    the exit status is 0 only if it completed."""
    api = Api(url, api_key)
    labels = {}
    for pair in metadata:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter("use KEY=VALUE", param_hint="--metadata")
        labels[key] = value
    path = "/v1/batches" + ("?" + urllib.parse.urlencode({"metadata": json.dumps(labels)}) if labels else "")
    headers = {"Content-Type": "application/jsonl", "Content-Length": str(file.stat().st_size)}
    with file.open("rb") as upload:  # streamed: the file is never read into memory whole
        created = api.json("POST", path, upload, headers=headers, timeout=600)
    click.echo(f"batch {created['id']}: {created['request_counts']['total']} requests queued", err=True)
    if not wait:
        click.echo(created["id"])
        return
    final = follow(api, created, poll)
    click.echo(json.dumps(final, indent=2))
    if final["status"] != "completed":
        sys.exit(1)


def follow(api: Api, batch: dict, poll_s: float) -> dict:
    """Poll the batch until it ends, drawing done/total, tokens/s and ETA on stderr."""
    from tqdm import tqdm

    counts = batch["request_counts"]
    started, tokens_at_start = time.monotonic(), batch["usage"]["completion_tokens"]
    with tqdm(total=counts["total"], unit="req", file=sys.stderr, dynamic_ncols=True, desc=batch["status"]) as bar:
        while True:
            counts = batch["request_counts"]
            bar.update(counts["completed"] + counts["failed"] + counts["cancelled"] - bar.n)
            elapsed = time.monotonic() - started
            rate = (batch["usage"]["completion_tokens"] - tokens_at_start) / elapsed if elapsed > 0 else 0.0
            bar.set_description(batch["status"], refresh=False)
            bar.set_postfix({"tokens/s": f"{rate:.1f}", "failed": counts["failed"]}, refresh=False)
            bar.refresh()
            if batch["status"] in ENDED:
                return batch
            time.sleep(poll_s)
            batch = api.json("GET", f"/v1/batches/{batch['id']}")


@batch.command("results")
@click.argument("batch_id")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), help="Write here, not to stdout.")
@api_options
def results(batch_id: str, output: Path | None, url: str | None, api_key: str | None):
    """Write the batch's results as JSONL in input order: {"custom_id", "index", "result" | "error"}."""
    api = Api(url, api_key)
    with api.open("GET", f"/v1/batches/{batch_id}/results", timeout=600) as response:
        status, ended = response.headers.get("X-Batch-Status"), response.headers.get("X-Batch-Ended")
        if output is None:
            shutil.copyfileobj(response, sys.stdout.buffer, CHUNK_BYTES)
            sys.stdout.flush()
        else:
            with output.open("wb") as out:
                shutil.copyfileobj(response, out, CHUNK_BYTES)
    where = f" to {output}" if output else ""
    click.echo(f"{ended} results{where}; the batch is {status}", err=True)


@batch.command("get")
@click.argument("batch_id")
@api_options
def get(batch_id: str, url: str | None, api_key: str | None):
    """Print the batch: status, counts, usage, timestamps."""
    click.echo(json.dumps(Api(url, api_key).json("GET", f"/v1/batches/{batch_id}"), indent=2))


@batch.command("list")
@click.option("--limit", default=20, show_default=True)
@api_options
def list_batches(limit: int, url: str | None, api_key: str | None):
    """List your batches, newest first: id, status, done/total, created."""
    page = Api(url, api_key).json("GET", f"/v1/batches?limit={limit}")
    for item in page["data"]:
        counts = item["request_counts"]
        done = counts["completed"] + counts["failed"] + counts["cancelled"]
        click.echo(f"{item['id']}\t{item['status']}\t{done}/{counts['total']}\t{item['created_at']}")


@batch.command("cancel")
@click.argument("batch_id")
@api_options
def cancel(batch_id: str, url: str | None, api_key: str | None):
    """Cancel the batch: queued requests never run, running ones stop; results so far are kept."""
    batch_view = Api(url, api_key).json("POST", f"/v1/batches/{batch_id}/cancel")
    click.echo(f"batch {batch_id}: {batch_view['status']}")
