"""`genqueue keys ...`: make, list and revoke API keys. Names are unique: a key's name is the owner its
jobs and batches are recorded under, so two keys with one name would see each other's work."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import click

import config


def _settings(keys_file: str | None) -> dict:
    settings = config.load()
    if keys_file:
        settings["API_KEYS_FILE"] = keys_file
    return settings


def _write_atomically(path: Path, lines: list[str]) -> None:
    """Replace the file whole (readers see the old or the new one), readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as out:
        out.write("".join(f"{line}\n" for line in lines))
    os.chmod(temporary, 0o600)
    os.replace(temporary, path)


file_option = click.option(
    "--file",
    "keys_file",
    type=click.Path(dir_okay=False),
    help="The keys file to change [env GENQUEUE_API_KEYS_FILE]; the API reads it again when it changes.",
)


@click.group("keys")
def keys() -> None:
    """Manage API keys."""


@keys.command("create")
@click.option("--name", required=True, help="The key's name, unique: its jobs and batches are recorded under it.")
@file_option
def create(name: str, keys_file: str | None) -> None:
    """Make a new API key: print it (give it to the client) and add its entry to the keys file, or
    print the entry to configure. A name already in use is refused."""
    from api.auth import check_owner, hash_key, load_keys, new_key

    settings = _settings(keys_file)
    try:
        check_owner(name)
        existing = load_keys(settings)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    if any(key.owner == name for key in existing):
        raise click.ClickException(f"a key named {name!r} exists already: names must be unique (revoke it first)")
    key = new_key()
    entry = f"{name}:{hash_key(key)}"
    click.echo(f"key:   {key}")
    click.echo(f"entry: {entry}")
    path = settings.get("API_KEYS_FILE")
    if path:
        lines = Path(path).read_text().splitlines() if Path(path).is_file() else []
        _write_atomically(Path(path), [*lines, entry])
        click.echo(f"Added to {path}; the API uses it within a second, no restart needed.", err=True)
    else:
        click.echo("Add the entry to GENQUEUE_API_KEYS (comma-separated) or use --file.", err=True)


@keys.command("revoke")
@click.option("--name", required=True, help="The name of the key to revoke.")
@file_option
def revoke(name: str, keys_file: str | None) -> None:
    """Remove a key from the keys file; the API refuses it within a second, no restart needed."""
    path = _settings(keys_file).get("API_KEYS_FILE")
    if not path or not Path(path).is_file():
        raise click.ClickException("give the keys file (--file or GENQUEUE_API_KEYS_FILE)")
    lines = Path(path).read_text().splitlines()
    kept = [line for line in lines if line.strip().rpartition(":")[0] != name]
    if len(kept) == len(lines):
        raise click.ClickException(f"no key named {name!r} in {path}")
    _write_atomically(Path(path), kept)
    click.echo(f"revoked {name!r}")


@keys.command("list")
@file_option
def list_keys(keys_file: str | None) -> None:
    """The names of the configured keys (never the keys: only their hashes are stored)."""
    from api.auth import load_keys

    try:
        for key in load_keys(_settings(keys_file)):
            click.echo(key.owner)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
