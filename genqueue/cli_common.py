"""What every client command (`genqueue job ...`, `genqueue batch ...`, `genqueue submit`) shares:
the same --url and --api-key, one API client, API errors as a clear message, and the exit codes.

Exit codes (README "Commands"):
- 0: done: the job succeeded, the batch completed with every request succeeded (or, detached, queued);
- 1: the API refused the request (the message names the fields at fault) or could not be reached;
- 2: the command was used wrongly (click's usage errors);
- 3: the job ended without succeeding (failed, cancelled), or the batch did not succeed in full
  (completed_with_errors, failed, cancelled);
- 4: --timeout ran out before the job or batch ended (it goes on).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import click

import config

EXIT_API_ERROR = 1
EXIT_UNSUCCESSFUL = 3
EXIT_PENDING = 4


def api_options(command: Callable) -> Callable:
    """--url (--api-url, its older name) and --api-key, for each command that talks to the API."""
    command = click.option("--api-key", help="API key, when the API requires one [env GENQUEUE_API_KEY].")(command)
    url_help = "The genqueue API [env GENQUEUE_URL, else GENQUEUE_API_URL, else http://HOST:PORT]."
    return click.option("--url", "--api-url", "url", help=url_help)(command)


def make_client(url: str | None, api_key: str | None):
    """The API client for these options, with the settings' defaults for what they leave out."""
    from genqueue.client import Client

    settings = config.load()
    return Client(url or config.client_url(settings), api_key or settings["API_KEY"])


def describe_error(exc: Any) -> str:
    """An API error as the message and, a line each, the fields at fault (at most 20)."""
    text = f"HTTP {exc.status} {exc.code}: {exc.message}" if exc.status else exc.message
    for field, problems in list(flatten(exc.fields))[:20]:
        text += f"\n  {field}: {' '.join(problems)}"
    return text


def flatten(fields: dict, prefix: str = "") -> Iterator[tuple[str, list[str]]]:
    for name, problems in fields.items():
        if isinstance(problems, dict):
            yield from flatten(problems, f"{prefix}{name}.")
        else:
            yield prefix + name, [str(p) for p in problems]


@contextlib.contextmanager
def api_errors() -> Iterator[None]:
    """An API error as a ClickException (exit 1) carrying the API's message and the fields at fault."""
    from genqueue.client import ApiClientError

    try:
        yield
    except ApiClientError as exc:
        raise click.ClickException(describe_error(exc)) from None


def fail(message: str, code: int) -> NoReturn:
    """Say why on standard error and exit with code."""
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def parse_pairs(pairs: tuple[str, ...], option: str) -> dict[str, str]:
    """KEY=VALUE options as a dict (metadata)."""
    found = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter("use KEY=VALUE", param_hint=option)
        found[key] = value
    return found
