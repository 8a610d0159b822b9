"""One webhook request, as the Standard Webhooks spec has it: where it may go, how it is signed, and
one attempt to send it.

Where: GENQUEUE_WEBHOOK_ALLOWED_HOSTS lists host names and CIDRs (and "*" for any public address;
an empty list means "*"). A URL's host is resolved and every address it resolves to is checked: a
listed name may resolve anywhere; otherwise each address must be in a listed CIDR, or public when
"*" applies. Loopback, private, link-local and other non-global addresses are refused unless
listed. The API checks this at submit (a URL that can never be delivered is a 400) and each attempt
checks it again, then connects to the very address it checked (a name that resolves elsewhere by
then cannot slip through). Redirects are never followed: a 3xx answer is a failed attempt.

How: headers webhook-id, webhook-timestamp (the attempt's Unix time) and webhook-signature,
"v1,<base64 of HMAC-SHA256(secret, '<id>.<timestamp>.<body>')>", with the secret of GENQUEUE_WEBHOOK_SECRET
("whsec_<base64>"). The algorithm is the spec's; the tests check it with the `standardwebhooks` package.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import http.client
import ipaddress
import secrets
import socket
import ssl
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

import config

SECRET_PREFIX = "whsec_"
MAX_URL_CHARS = 2048
ANSWER_BYTES = 64 * 1024  # what is read of a receiver's answer before the connection is closed

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class WebhookRefused(ValueError):
    """A webhook URL genqueue will not send to; the message says why."""


class HostUnresolved(WebhookRefused):
    """The URL's host does not resolve (now: at delivery, it may later)."""


# -- the secret and the signature ------------------------------------------------------------------


def new_secret() -> str:
    """A new signing secret: 32 random bytes, as whsec_<base64>."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_key(secret: Any) -> bytes:
    """The key of a whsec_<base64> secret; ValueError for anything else (or nothing)."""
    if not isinstance(secret, str) or not secret.startswith(SECRET_PREFIX):
        raise ValueError("GENQUEUE_WEBHOOK_SECRET must be whsec_<base64> (genqueue webhooks secret makes one)")
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"GENQUEUE_WEBHOOK_SECRET is not valid base64 after {SECRET_PREFIX}: {exc}") from exc
    if len(key) < 16:
        raise ValueError("GENQUEUE_WEBHOOK_SECRET is too short: at least 16 bytes of key")
    return key


def signature(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


# -- where webhooks may go -------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A checked URL: the host to name (Host header, TLS), where to connect, and the path to ask for."""

    https: bool
    host: str
    port: int
    addresses: tuple[Address, ...]
    path: str


@dataclass(frozen=True)
class AllowedHosts:
    names: frozenset[str]
    networks: tuple[Network, ...]
    any_public: bool

    @classmethod
    def parse(cls, spec: Any) -> AllowedHosts:
        """From GENQUEUE_WEBHOOK_ALLOWED_HOSTS: a comma-separated string (or a JSON list) of host
        names, CIDRs or addresses, and "*"; nothing listed means any public address."""
        entries = spec if isinstance(spec, list) else str(spec or "").split(",")
        names: set[str] = set()
        networks: list[Network] = []
        any_public = False
        for entry in (str(e).strip().lower().rstrip(".") for e in entries):
            if entry == "*":
                any_public = True
            elif entry:
                try:
                    networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                except ValueError:
                    names.add(entry)
        return cls(frozenset(names), tuple(networks), any_public or not (names or networks))

    def check(self, url: Any) -> Target:
        """The URL resolved and checked; WebhookRefused says why it may not be sent to."""
        parts = _split(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        listed = host.rstrip(".") in self.names
        addresses = resolve(host, port)
        for address in addresses:
            if not (listed or any(address in network for network in self.networks)):
                if not self.any_public:
                    raise WebhookRefused(f"{host} is not in GENQUEUE_WEBHOOK_ALLOWED_HOSTS")
                if not address.is_global:
                    raise WebhookRefused(
                        f"{host} resolves to {address}, a {kind_of(address)} address; webhooks go to public "
                        "addresses unless GENQUEUE_WEBHOOK_ALLOWED_HOSTS lists it"
                    )
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return Target(parts.scheme == "https", host, port, addresses, path)


@lru_cache(maxsize=8)
def allowed_hosts(spec: str) -> AllowedHosts:
    return AllowedHosts.parse(spec)


def check_url(url: Any, settings: Any) -> Target:
    """The URL checked against the settings' allowed hosts (see AllowedHosts.check)."""
    spec = settings["WEBHOOK_ALLOWED_HOSTS"]
    return allowed_hosts(",".join(map(str, spec)) if isinstance(spec, list) else str(spec or "")).check(url)


def _split(url: Any):
    if not isinstance(url, str) or len(url) > MAX_URL_CHARS:
        raise WebhookRefused(f"a webhook must be an http(s) URL of at most {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a port that is not a number
    except ValueError as exc:
        raise WebhookRefused(f"not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused("a webhook must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise WebhookRefused("a webhook URL may not carry credentials: the signature authenticates genqueue")
    return parts


def resolve(host: str, port: int) -> tuple[Address, ...]:
    """Every address host resolves to (an IPv4-mapped IPv6 address as its IPv4 address)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise HostUnresolved(f"{host} does not resolve: {exc}") from exc
    found: list[Address] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if address not in found:
            found.append(address)
    return tuple(found)


def kind_of(address: Address) -> str:
    for kind in ("loopback", "link_local", "unspecified", "multicast", "private", "reserved"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    return "non-public"


# -- one attempt ------------------------------------------------------------------------------------


class _Connection(http.client.HTTPConnection):
    """HTTP to a checked address, naming the host in the Host header."""

    def __init__(self, target: Target, address: Address, timeout_s: float):
        super().__init__(target.host, target.port, timeout=timeout_s)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((str(self._address), self.port), self.timeout)


class _TlsConnection(_Connection):
    """HTTPS to a checked address: the certificate is checked against the host's name."""

    _tls = ssl.create_default_context()

    def connect(self) -> None:
        super().connect()
        self.sock = self._tls.wrap_socket(self.sock, server_hostname=self.host)


def post(target: Target, key: bytes, message_id: str, timestamp: int, body: bytes, timeout_s: float) -> int:
    """POST the signed body to the first of the target's addresses that accepts a connection: the
    answer's status. OSError (a timeout too) when none connects or the one that did fails; a request
    is never sent twice."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"genqueue/{config.VERSION}",
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(key, message_id, timestamp, body),
    }
    kind = _TlsConnection if target.https else _Connection
    connection: _Connection | None = None
    error = OSError(f"{target.host} has no address")
    for address in target.addresses:
        candidate = kind(target, address, timeout_s)
        try:
            candidate.connect()
        except OSError as exc:
            candidate.close()
            error = exc
            continue
        connection = candidate
        break
    if connection is None:
        raise error
    try:
        connection.request("POST", target.path, body=body, headers=headers)
        response = connection.getresponse()
        response.read(ANSWER_BYTES)
        return response.status
    except http.client.HTTPException as exc:
        raise OSError(f"{target.host} answered with no valid HTTP: {exc!r}") from exc
    finally:
        connection.close()
