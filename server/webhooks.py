"""Webhooks: where the server may POST (destination policy), and how it does (pinned, signed, retried).

Policy. A webhook is an outbound request that a caller aims, so by default it may only reach the public internet:
every address that is, or resolves to, loopback, private, link-local, CGNAT, multicast, unspecified or reserved
space (IPv4, IPv6, and IPv4 inside IPv6: mapped, 6to4, Teredo, NAT64) is refused. A literal address is refused at
Submit, in every spelling the C resolver accepts (`127.1`, `2130706433`, `0x7f000001`, `[::ffff:127.0.0.1]`), and
so is `localhost`; a name is resolved at delivery and refused if any of its addresses is. Operators open what they
need with `--webhook-allow CIDR|HOST` (repeatable): a network is then allowed, or a host name whatever it resolves
to.

Delivery connects to the very address that was checked (the Host header and TLS name stay the URL's host), so a
second DNS answer cannot move it elsewhere, and it follows no redirects. Each POST is signed: with the server's
webhook secret S, `X-Pixart-Signature: v1=<hex HMAC-SHA256(S, timestamp + "." + body)>` and
`X-Pixart-Timestamp: <unix seconds>`; `Idempotency-Key` is the request id, the same on every retry. A failure
(connection error, timeout, 408, 429 or 5xx) is retried with exponential backoff; other answers are final.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

log = logging.getLogger("pixart.server.webhooks")

MAX_URL_CHARS = 2048
# The URL forms Submit accepts (the HTTP port's document publishes it): http(s), a host name or IPv4 address
# (IPv6 literals are not accepted: use a name), an optional port, then printable ASCII. The destination policy
# below then judges the host.
URL_PATTERN = (r"^https?://[A-Za-z0-9._~%!$&'()*+,;=-]+"
               r"(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4}))?"
               r"([/?#][\x21-\x7e]*)?$")
_URL = re.compile(URL_PATTERN)
FIELD = "webhook_url"
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_RETRY_STATUSES = {408, 429}


class Refused(Exception):
    """The destination is not allowed by the webhook policy."""


def _embedded_ipv4(addr: Address) -> ipaddress.IPv4Address | None:
    if isinstance(addr, ipaddress.IPv4Address):
        return None
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def is_public(addr: Address) -> bool:
    """A globally routable unicast address (and, for IPv6 carrying IPv4, the IPv4 inside is too)."""
    inner = _embedded_ipv4(addr)
    if inner is not None and not is_public(inner):
        return False
    return addr.is_global and not (addr.is_multicast or addr.is_reserved or addr.is_unspecified
                                   or addr.is_loopback or addr.is_link_local or addr.is_private)


def literal_address(host: str) -> Address | None:
    """The address a host part spells, in any form the C resolver would accept as a number; None for a name."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    try:  # inet_aton's legacy spellings: 127.1, 2130706433, 0x7f000001, 0177.0.0.1
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


# getaddrinfo has no timeout of its own (a slow resolver holds its thread for tens of seconds): lookups run on a few
# threads of their own and a delivery waits RESOLVE_TIMEOUT_S for one; a lookup that outlives it keeps only its own
# thread, and when all of those are stuck, new lookups time out at once instead of piling up.
RESOLVE_TIMEOUT_S = 5.0
_RESOLVER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pixart-resolve")


def _resolve(host: str, port: int) -> list[Address]:
    lookup = _RESOLVER.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        infos = lookup.result(timeout=RESOLVE_TIMEOUT_S)
    except concurrent.futures.TimeoutError:
        lookup.cancel()
        raise OSError(f"resolving the host took more than {RESOLVE_TIMEOUT_S:g} s") from None
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos))


@dataclass
class WebhookPolicy:
    """`allow`: CIDRs (or single addresses) and host names an operator opened; everything public is allowed."""

    allow: Iterable[str] = ()
    resolve: Callable[[str, int], list[Address]] = _resolve
    networks: list = field(init=False)
    hosts: set[str] = field(init=False)

    def __post_init__(self) -> None:
        self.networks, self.hosts = [], set()
        for entry in self.allow:
            entry = entry.strip()
            if not entry:
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.hosts.add(entry.lower().rstrip("."))

    def address_allowed(self, addr: Address) -> bool:
        return is_public(addr) or any(addr.version == n.version and addr in n for n in self.networks)

    def violations(self, url: str) -> list[tuple[str, str]]:
        """Submit-time rules: an absolute http(s) URL, bounded, not aimed at a refused literal address."""
        if not url:
            return []
        if len(url) > MAX_URL_CHARS:
            return [(FIELD, f"must be at most {MAX_URL_CHARS} characters")]
        if not url.isascii():
            return [(FIELD, "must be ASCII (punycode for the host, percent-encoding for the path)")]
        if _URL.fullmatch(url) is None:
            return [(FIELD, "must be an absolute http:// or https:// URL with a host name or IPv4 address")]
        host = urlsplit(url).hostname or ""
        if host.rstrip(".") in self.hosts:
            return []
        addr = literal_address(host)
        if addr is None and (host.rstrip(".") == "localhost" or host.rstrip(".").endswith(".localhost")):
            addr = ipaddress.IPv4Address("127.0.0.1")  # always loopback (RFC 6761): allowed where loopback is
        refused = addr is not None and not self.address_allowed(addr)
        if refused:
            return [(FIELD, "must not point at a loopback, private, link-local or otherwise non-public address "
                            "(the operator can allow one with --webhook-allow)")]
        return []

    def destination(self, url: str) -> tuple[str, int, list[Address]]:
        """(host, port, the addresses to try in order) for a delivery; raises Refused when any is refused."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if self.violations(url):
            raise Refused("the URL is not allowed")
        addr = literal_address(host)
        addresses = [addr] if addr is not None else self.resolve(host, port)
        if not addresses:
            raise Refused("the host does not resolve")
        if host.rstrip(".") in self.hosts:
            return host, port, addresses
        bad = [a for a in addresses if not self.address_allowed(a)]
        if bad:
            raise Refused(f"the host resolves to a refused address ({bad[0]})")
        return host, port, addresses


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    return "v1=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def verify(secret: bytes, headers: dict[str, str], body: bytes, tolerance_s: float = 300.0) -> bool:
    """What a receiver does: the signature matches and the timestamp is recent (replays are refused)."""
    lower = {k.lower(): v for k, v in headers.items()}
    timestamp = lower.get("x-pixart-timestamp", "")
    try:
        fresh = abs(time.time() - int(timestamp)) <= tolerance_s
    except ValueError:
        return False
    expected = signature(secret, timestamp, body)
    return fresh and hmac.compare_digest(expected, lower.get("x-pixart-signature", ""))


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a fixed address, with SNI and certificate checks against the URL's host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float, context: ssl.SSLContext):
        super().__init__(host, port, timeout=timeout, context=context)
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


@dataclass
class Delivery:
    request_id: str
    url: str
    body: bytes
    connection: http.client.HTTPConnection | None = field(default=None, repr=False)  # the attempt's, while open


def _shut(delivery: Delivery) -> None:
    """The attempt's deadline: whatever the exchange is blocked on fails at once."""
    sock = delivery.connection.sock if delivery.connection is not None else None
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # already closed
            pass


class WebhookSender:
    """Delivers signed POSTs on the event loop's tasks; the blocking HTTP exchange runs in a worker thread."""

    def __init__(self, policy: WebhookPolicy, secret: bytes, *, timeout_s: float = 10.0, attempts: int = 5,
                 backoff_s: float = 1.0, ssl_context: ssl.SSLContext | None = None, threads: int = 4):
        self.policy, self.secret = policy, secret
        self.timeout_s, self.attempts, self.backoff_s = timeout_s, attempts, backoff_s
        self.ssl_context = ssl_context or ssl.create_default_context()
        # Deliveries have threads of their own: a slow receiver (or its slow DNS) must not occupy the event loop's
        # default pool, which the store and the HTTP port use.
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pixart-webhook")

    def _post_once(self, delivery: Delivery) -> int:
        """One attempt: each checked address in turn until one connects (a dual-stack name may list an address
        this host cannot route first); the Idempotency-Key makes a repeat harmless."""
        host, port, addresses = self.policy.destination(delivery.url)
        error: OSError | None = None
        for address in addresses:
            try:
                return self._post_to(delivery, host, port, str(address))
            except OSError as exc:
                error = exc
        raise error if error is not None else OSError("no address to connect to")

    def _post_to(self, delivery: Delivery, host: str, port: int, address: str) -> int:
        """One POST, over in `timeout_s` whatever the receiver does: socket timeouts bound each read and write, and
        a timer shuts the socket at the deadline, so that a receiver dripping a byte every few seconds cannot hold
        the thread (or outlive the delivery's claim)."""
        deadline = threading.Timer(self.timeout_s, _shut, args=(delivery,))
        deadline.daemon = True
        deadline.start()
        try:
            return self._exchange(delivery, host, port, address)
        finally:
            deadline.cancel()

    def _exchange(self, delivery: Delivery, host: str, port: int, address: str) -> int:
        parts = urlsplit(delivery.url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if parts.scheme == "https":
            conn: http.client.HTTPConnection = _PinnedHTTPSConnection(host, port, address, self.timeout_s,
                                                                      self.ssl_context)
        else:
            conn = http.client.HTTPConnection(address, port, timeout=self.timeout_s)
        timestamp = str(int(time.time()))
        host_header = f"[{host}]" if ":" in host else host
        if parts.port is not None:
            host_header += f":{parts.port}"
        headers = {
            "Host": host_header,
            "Content-Type": "application/json",
            "User-Agent": "pixart-sigma-serve webhook",
            "Idempotency-Key": delivery.request_id,
            "X-Pixart-Request-Id": delivery.request_id,
            "X-Pixart-Timestamp": timestamp,
            "X-Pixart-Signature": signature(self.secret, timestamp, delivery.body),
        }
        delivery.connection = conn
        try:
            conn.request("POST", path, body=delivery.body, headers=headers)
            response = conn.getresponse()
            response.read(64 * 1024)  # the receiver's answer is not ours to hold
            return response.status
        finally:
            delivery.connection = None
            conn.close()

    async def deliver(self, delivery: Delivery) -> bool:
        """POST until a final answer; True when the receiver took it (2xx)."""
        for attempt in range(1, self.attempts + 1):
            retry = True
            try:
                status = await asyncio.get_running_loop().run_in_executor(self.executor, self._post_once, delivery)
                if 200 <= status < 300:
                    log.info("webhook delivered", extra={"request_id": delivery.request_id, "attempt": attempt})
                    return True
                retry = status >= 500 or status in _RETRY_STATUSES
                problem = f"HTTP {status}" + (" (redirects are not followed)" if 300 <= status < 400 else "")
            except Refused as exc:
                retry, problem = False, f"refused by the webhook policy: {exc}"
            except (OSError, http.client.HTTPException) as exc:
                problem = f"{type(exc).__name__}: {str(exc)[:200]}"
            except ValueError as exc:  # a URL http.client cannot send (stored before the ASCII rule): final
                retry, problem = False, f"{type(exc).__name__}: {str(exc)[:200]}"
            final = not retry or attempt == self.attempts
            log.warning("webhook attempt failed", extra={"request_id": delivery.request_id, "attempt": attempt,
                                                         "error": problem, "final": final})
            if final:
                return False
            delay = self.backoff_s * 2 ** (attempt - 1)
            await asyncio.sleep(delay * (0.75 + 0.5 * random.random()))
        return False


def body_json(payload: dict) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()
