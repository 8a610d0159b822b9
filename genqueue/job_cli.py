"""`genqueue job ...`: submit a generation and read, wait for, stream, cancel and list jobs.

A client of the HTTP API (genqueue/client.py); it imports nothing of the server. `genqueue submit`
is `genqueue job submit` under its older name. Exit codes: genqueue/cli_common.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from genqueue.cli_common import (
    EXIT_PENDING,
    EXIT_UNSUCCESSFUL,
    api_errors,
    api_options,
    fail,
    make_client,
    parse_pairs,
)

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")


@click.group("job")
def job() -> None:
    """Jobs through the HTTP API: submit, get, wait, stream, cancel, list."""


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def read_messages(path: str) -> list[dict]:
    """The JSON array of {role, content} in the file ('-': standard input)."""
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    try:
        messages = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--messages") from None
    if not isinstance(messages, list):
        raise click.BadParameter("give a JSON array of {role, content}", param_hint="--messages")
    return messages


def request_body(prompt: str | None, system: str | None, messages_file: str | None) -> dict[str, Any]:
    """A prompt alone is sent as `prompt`; with --system or --messages, as `messages`: the system
    turn, the file's turns, then PROMPT as the last user turn."""
    if prompt == "-":
        prompt = sys.stdin.read()
    if system is None and messages_file is None:
        if prompt is None:
            raise click.UsageError("give PROMPT ('-' reads it from standard input), or --messages FILE")
        return {"prompt": prompt}
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages += read_messages(messages_file) if messages_file else []
    if prompt is not None:
        messages.append({"role": "user", "content": prompt})
    return {"messages": messages}


def end_with(job) -> None:
    """Exit 3 for a job that ended without succeeding, 4 for one still going."""
    if job.status == "succeeded":
        return
    if job.ended:
        fail(f"job {job.id} {job.status}: {json.dumps(job.error)}", EXIT_UNSUCCESSFUL)
    fail(f"job {job.id} is still {job.status}", EXIT_PENDING)


@job.command("submit")
@click.argument("prompt", required=False)
@click.option("--system", help="A system prompt: sent as the first of the job's messages.")
@click.option(
    "--messages",
    "messages_file",
    metavar="FILE",
    help="A JSON array of {role, content} turns ('-': standard input); PROMPT, if given, is added as the last.",
)
@click.option("--stream", is_flag=True, help="Print the text as it is generated (Server-Sent Events).")
@click.option("--max-tokens", type=int, help="Tokens to generate at most [API default 256].")
@click.option("--temperature", type=float, help="0 is greedy [API default 0.6].")
@click.option("--top-p", type=float)
@click.option("--top-k", type=int)
@click.option("--stop", multiple=True, help="End at this string, left out of the text (repeatable, up to 4).")
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the chat template.")
@click.option("--lora", help="A LoRA variant of the served model (see genqueue model prepare --lora).")
@click.option("--metadata", "-m", multiple=True, metavar="KEY=VALUE", help="Label the job (repeatable).")
@click.option("--webhook", help="An http(s) URL told by a signed POST when the job ends.")
@click.option("--detach", is_flag=True, help="Print only the job id and return once it is queued.")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON (status, result, usage), not its text.")
@api_options
def submit(
    prompt,
    system,
    messages_file,
    stream,
    max_tokens,
    temperature,
    top_p,
    top_k,
    stop,
    raw,
    lora,
    metadata,
    webhook,
    detach,
    as_json,
    url,
    api_key,
) -> None:
    """Submit PROMPT ('-' reads it from standard input) and print the generated text.

    The job id goes to standard error, the text to standard output (with --json, the whole job).
    Exit status: 0 once the job succeeded, 1 if the API refused it, 3 if it failed or was cancelled."""
    body = request_body(prompt, system, messages_file)
    options = {
        "raw": raw or None,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "stop": list(stop) or None,
        "lora": lora,
        "metadata": parse_pairs(metadata, "--metadata") or None,
        "webhook": webhook,
    }
    body.update({name: value for name, value in options.items() if value is not None})
    client = make_client(url, api_key)
    with api_errors():
        if stream and not detach:
            print_stream(client.stream(body), as_json, client)
            return
        queued = client.submit(body)
        if detach:
            click.echo(json.dumps(queued.raw, indent=2, ensure_ascii=False) if as_json else queued.id)
            return
        click.echo(f"job {queued.id}", err=True)
        ended = client.wait(queued.id)
    if as_json:
        print_json(ended.raw)
    end_with(ended)
    if not as_json:
        click.echo(ended.text)


def print_stream(stream, as_json: bool, client) -> None:
    """The job's text as it comes (with --json, the job once it ends); exit 3 if it fails."""
    from genqueue.client import ApiClientError

    click.echo(f"job {stream.job_id}", err=True)
    try:
        for text in stream.texts():
            if not as_json:
                sys.stdout.write(text)
                sys.stdout.flush()  # each piece as it arrives, not when a buffer fills
    except ApiClientError as exc:
        click.echo()
        fail(f"job {stream.job_id} failed: {exc.code}: {exc.message}", EXIT_UNSUCCESSFUL)
    if as_json:
        with api_errors():
            print_json(client.get(stream.job_id).raw)
    else:
        click.echo()


@job.command("get")
@click.argument("job_id")
@click.option("--wait", "wait_s", type=float, default=0, help="Wait up to this many seconds (0 to 60) for the end.")
@api_options
def get(job_id, wait_s, url, api_key) -> None:
    """Print the job JOB_ID as JSON: status, timestamps, result or error, metadata."""
    with api_errors():
        print_json(make_client(url, api_key).get(job_id, wait_s).raw)


@job.command("wait")
@click.argument("job_id")
@click.option("--timeout", "timeout_s", type=float, help="Give up after this many seconds (exit 4) [default: none].")
@api_options
def wait(job_id, timeout_s, url, api_key) -> None:
    """Wait for the job JOB_ID to end and print it as JSON.

    Exit status: 0 if it succeeded, 3 if it failed or was cancelled, 4 if --timeout ran out first."""
    with api_errors():
        ended = make_client(url, api_key).wait(job_id, timeout_s)
    print_json(ended.raw)
    end_with(ended)


@job.command("stream")
@click.argument("job_id")
@click.option("--after", "last_event_id", type=int, default=0, help="Resume after this event id (Last-Event-ID).")
@api_options
def stream_job(job_id, last_event_id, url, api_key) -> None:
    """Print the text of the job JOB_ID as it is generated, from the start (a job that ended: at once).

    Exit status: 0 once it ends, 3 if it failed."""
    client = make_client(url, api_key)
    with api_errors():
        print_stream(client.follow(job_id, last_event_id), False, client)


@job.command("cancel")
@click.argument("job_id")
@api_options
def cancel(job_id, url, api_key) -> None:
    """Cancel the job JOB_ID and print it as JSON: a queued job never runs, a running one stops within
    a few tokens and keeps its partial output. An ended job cannot be cancelled (exit 1, 409)."""
    with api_errors():
        print_json(make_client(url, api_key).cancel(job_id).raw)


@job.command("list")
@click.option("--status", type=click.Choice(JOB_STATES))
@click.option("--batch", "batch_id", help="The jobs of this batch.")
@click.option("--limit", default=20, show_default=True, help="At most this many (newest first).")
@api_options
def list_jobs(status, batch_id, limit, url, api_key) -> None:
    """List your jobs, newest first: id, status, created, completion tokens."""
    with api_errors():
        page = make_client(url, api_key).list_jobs(limit, status=status, batch_id=batch_id)
    for item in page.data:
        tokens = item.result.usage.completion_tokens if item.result else "-"
        click.echo(f"{item.id}\t{item.status}\t{item.created_at}\t{tokens}")
