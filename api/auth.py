"""API keys: stored as SHA-256 hashes, checked in constant time, each job visible to its key alone.

Keys come from GENQUEUE_API_KEYS ("name:hash" entries, comma-separated) and/or the file named by
GENQUEUE_API_KEYS_FILE (one entry a line, # comments). Each key has an owner name, unique among the
keys: jobs, batches and Idempotency-Keys are recorded under it, so two keys never see each other's.
`genqueue keys create --name NAME` makes a key and its entry (and adds it to the file with --file).
The file is read again when it changes, so adding or revoking a key needs no restart. With no key
configured at all the API is open, and `genqueue api` binds to 127.0.0.1 only.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask, current_app, g, request

from api.errors import ApiError

log = logging.getLogger(__name__)

KEY_PREFIX = "gq_"
OWNER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RELOAD_CHECK_S = 1.0  # how often the keys file's modification time is looked at


@dataclass(frozen=True)
class ApiKey:
    owner: str  # the name jobs are recorded under
    sha256: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def check_owner(name: str) -> str:
    if not OWNER_PATTERN.match(name or ""):
        raise ValueError(
            f"invalid key name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def parse_entries(entries: Iterable[str]) -> list[ApiKey]:
    """Entries "name:sha256" (a bare sha256 is named after its first 12 digits); raises ValueError
    for a malformed entry or an owner name given twice."""
    keys: list[ApiKey] = []
    for raw in entries:
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        owner, _, digest = entry.rpartition(":")
        digest = digest.lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(
                f"API key entry {entry[:20]!r}... is not a SHA-256 hex digest (see 'genqueue keys create')"
            )
        keys.append(ApiKey(owner=check_owner(owner) if owner else digest[:12], sha256=digest))
    owners = [key.owner for key in keys]
    duplicated = sorted({owner for owner in owners if owners.count(owner) > 1})
    if duplicated:
        raise ValueError(f"API key names must be unique; given more than once: {', '.join(duplicated)}")
    return keys


def configured_entries(config: Mapping[str, Any]) -> list[str]:
    """The entries of GENQUEUE_API_KEYS and of the file GENQUEUE_API_KEYS_FILE names (if it exists)."""
    entries: list[str] = []
    configured = config.get("API_KEYS")
    if isinstance(configured, str):
        entries += configured.split(",")
    elif configured:
        entries += list(configured)
    path = config.get("API_KEYS_FILE")
    if path and Path(path).is_file():
        entries += Path(path).read_text().splitlines()
    return entries


def keys_configured(config: Mapping[str, Any]) -> bool:
    """Whether the API requires keys: some entry is given, or a keys file is named (even an empty one:
    then no key is valid yet)."""
    return bool(config.get("API_KEYS_FILE")) or any(e.strip() for e in configured_entries(config))


def load_keys(config: Mapping[str, Any]) -> list[ApiKey]:
    return parse_entries(configured_entries(config))


class KeyRing:
    """The valid keys, read again when the keys file changes. A file that no longer parses keeps the
    keys last read (and says why in the log), so a half-written edit locks nobody out or in by accident."""

    def __init__(self, config: Mapping[str, Any]):
        self.config = config
        self.required = keys_configured(config)
        self.path = Path(config["API_KEYS_FILE"]) if config.get("API_KEYS_FILE") else None
        self._keys = load_keys(config)
        self._stamp = self._file_stamp()
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def keys(self) -> list[ApiKey]:
        if self.path is not None and time.monotonic() - self._checked >= RELOAD_CHECK_S:
            self._reload_if_changed()
        return self._keys

    def owner_of(self, token: str) -> str | None:
        digest = hash_key(token)
        owner = None
        for key in self.keys():  # compare with every key, in constant time each, so timing reveals nothing
            if hmac.compare_digest(digest, key.sha256):
                owner = key.owner
        return owner

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self.path) if self.path is not None else None
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size) if stat else None

    def _reload_if_changed(self) -> None:
        with self._lock:
            self._checked = time.monotonic()
            stamp = self._file_stamp()
            if stamp == self._stamp:
                return
            try:
                self._keys = load_keys(self.config)
                log.info("API keys reloaded from %s: %d keys", self.path, len(self._keys))
            except (OSError, ValueError) as exc:
                log.error("API keys file %s not reloaded, keeping the keys read before: %s", self.path, exc)
            self._stamp = stamp


def public(view: Callable) -> Callable:
    """Mark a view as reachable without a key (health checks, the playground, the docs)."""
    view.genqueue_public = True  # type: ignore[attr-defined]
    return view


def current_owner() -> str | None:
    """The owner of the request's key; None when the API is open (no keys configured) or the view is
    public and the request sent no valid key."""
    return g.get("genqueue_owner")


def bearer_token() -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _authenticate() -> None:
    ring: KeyRing = current_app.extensions["genqueue.api_keys"]
    if not ring.required:
        return
    token = bearer_token()
    owner = ring.owner_of(token) if token else None
    if owner is not None:
        g.genqueue_owner = owner
        return
    endpoint = request.endpoint or ""
    view = current_app.view_functions.get(endpoint)
    is_static = endpoint == "static" or endpoint.endswith(".static")  # a page's own assets
    if view is not None and not getattr(view, "genqueue_public", False) and not is_static:
        refuse(token)


def refuse(token: str | None, what: str = "API key") -> None:
    """401 without a token, 403 with a wrong one."""
    if token is None:
        raise ApiError(
            401,
            "unauthorized",
            f"send an {what} as 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": 'Bearer realm="genqueue"'},
        )
    raise ApiError(403, "forbidden", f"this {what} is not valid")


def require_key() -> None:
    """For a public view that sometimes needs a key: refuse a caller without a valid one (keys on)."""
    if current_app.extensions["genqueue.api_keys"].required and current_owner() is None:
        refuse(bearer_token())


def authenticated() -> bool:
    """Whether the caller may see operational details: it sent a valid key, or the API is open."""
    return current_owner() is not None or not current_app.extensions["genqueue.api_keys"].required


def init_app(app: Flask) -> None:
    app.extensions["genqueue.api_keys"] = KeyRing(app.config)
    app.before_request(_authenticate)
