"""`genqueue batch ...`: submit a JSONL file as a batch, follow it with a progress bar, get its results.

A client of the HTTP API (--url, --api-key: genqueue/cli_common.py); it imports nothing of the server.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import click

from genqueue.cli_common import EXIT_PENDING, EXIT_UNSUCCESSFUL, api_errors, api_options, fail, parse_pairs
from genqueue.cli_common import make_client as client

CHUNK_BYTES = 1 << 16
BATCH_SUCCEEDED = "completed"  # every request succeeded: exit 0 (cli_common.py lists the exit codes)


@click.group("batch")
def batch() -> None:
    """Run many requests as one batch: submit, follow, results, cancel."""


@batch.command("submit")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--wait", is_flag=True, help="Follow the batch with a progress bar until it ends.")
@click.option("--metadata", "-m", multiple=True, metavar="KEY=VALUE", help="Label the batch (repeatable).")
@click.option("--poll", default=1.0, show_default=True, help="Seconds between progress updates.")
@click.option("--webhook", help="An http(s) URL told once, by a signed POST, when the batch ends.")
@click.option("--timeout", "timeout_s", type=float, help="With --wait: give up after this many seconds (exit 4).")
@api_options
def submit(
    file: Path,
    wait: bool,
    metadata: tuple[str, ...],
    poll: float,
    webhook: str | None,
    timeout_s: float | None,
    url: str | None,
    api_key: str | None,
):
    """Submit FILE, one {"custom_id", "body": {...job request}} a line, as a batch; print its id.

    With --wait, show done/total, tokens/s and the time left until it ends, then print the batch.
    Exit status: 0 only if it completed with every request succeeded; 1 if the API refused the file
    (each bad line is named); 3 if it ended otherwise (completed_with_errors, failed, cancelled);
    4 if --timeout ran out first."""
    api = client(url, api_key)
    labels = parse_pairs(metadata, "--metadata")
    with file.open("rb") as upload, api_errors():  # streamed: the file is never read into memory whole
        created = api.create_batch(upload, file.stat().st_size, labels or None, webhook)
    click.echo(f"batch {created.id}: {created.request_counts.total} requests queued", err=True)
    if not wait:
        click.echo(created.id)
        return
    with api_errors():
        final = follow(api, created, poll, timeout_s)
    click.echo(json.dumps(final.raw, indent=2))
    if final.status != BATCH_SUCCEEDED:
        counts = final.request_counts
        summary = f"{counts.completed} succeeded, {counts.failed} failed, {counts.cancelled} cancelled"
        if final.ended:
            fail(f"batch {final.id} {final.status}: {summary}", EXIT_UNSUCCESSFUL)
        fail(f"batch {final.id} is still {final.status}: {summary}", EXIT_PENDING)


def follow(api, batch, poll_s: float, timeout_s: float | None = None):
    """Wait for the batch to end (Client.wait_batch), drawing done/total, tokens/s and ETA on stderr."""
    from tqdm import tqdm

    started, tokens_at_start = time.monotonic(), batch.usage.completion_tokens
    with tqdm(total=batch.request_counts.total, unit="req", file=sys.stderr, dynamic_ncols=True) as bar:

        def draw(now) -> None:
            counts = now.request_counts
            bar.update(counts.ended - bar.n)
            elapsed = time.monotonic() - started
            rate = (now.usage.completion_tokens - tokens_at_start) / elapsed if elapsed > 0 else 0.0
            bar.set_description(now.status, refresh=False)
            bar.set_postfix({"tokens/s": f"{rate:.1f}", "failed": counts.failed}, refresh=False)
            bar.refresh()

        return api.wait_batch(batch.id, poll_s, progress=draw, timeout_s=timeout_s)


@batch.command("results")
@click.argument("batch_id")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), help="Write here, not to stdout.")
@api_options
def results(batch_id: str, output: Path | None, url: str | None, api_key: str | None):
    """Write the batch's results as JSONL in input order: {"custom_id", "index", "result" | "error"}."""
    with api_errors(), client(url, api_key) as api:
        response = api.batch_results(batch_id)
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
    with api_errors():
        click.echo(json.dumps(client(url, api_key).get_batch(batch_id).raw, indent=2))


@batch.command("list")
@click.option("--limit", default=20, show_default=True)
@api_options
def list_batches(limit: int, url: str | None, api_key: str | None):
    """List your batches, newest first: id, status, done/total, created."""
    with api_errors():
        page = client(url, api_key).list_batches(limit)
    for item in page.data:
        counts = item.request_counts
        click.echo(f"{item.id}\t{item.status}\t{counts.ended}/{counts.total}\t{item.created_at}")


@batch.command("cancel")
@click.argument("batch_id")
@api_options
def cancel(batch_id: str, url: str | None, api_key: str | None):
    """Cancel the batch: queued requests never run, running ones stop; results so far are kept."""
    with api_errors():
        batch_view = client(url, api_key).cancel_batch(batch_id)
    click.echo(f"batch {batch_id}: {batch_view.status}")
