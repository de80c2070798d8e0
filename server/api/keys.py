"""API keys: `Authorization: Key <key>` or `Bearer <key>` (an HTTP header, or gRPC metadata), checked in one place
for every port.

Each key has a name, which is what logs, metrics and the store record of a request (its tenant), never the key. Only
a key's SHA-256 is kept; a presented key is hashed and compared with hmac.compare_digest against every configured
digest (no early exit, equal lengths), so timing says nothing about how much of a key was right. No key configured:
no authentication, and every request has the empty tenant.

A keys file has one key a line (`#` starts a comment): `KEY` (named `key-` and the first 8 hex digits of its
SHA-256), `NAME KEY`, or `NAME sha256:HEX` (the key's SHA-256, so that the file need not hold the key), each of the
named forms optionally followed by limits: `max_active=N` (requests queued or running at once) and `rate=R`
(requests accepted per second), and by `admin`. Several keys may share a name: one tenant, keys rotated (limits are
the tenant's; the first line that names them wins).

Requests belong to the tenant that submitted them: with keys configured, a key sees, follows, cancels and fetches
(without a signed URL) only its own tenant's requests, and another tenant's id is answered as unknown. An `admin` key
sees every tenant's.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from server.core.work import Limits

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


@dataclass(frozen=True)
class Key:
    name: str  # the tenant: what logs, metrics and the store name, never the key
    digest: bytes  # SHA-256 of the key
    limits: Limits = Limits()
    admin: bool = False  # sees every tenant's requests

    @classmethod
    def plain(cls, key: str, name: str | None = None) -> Key:
        digest = hashlib.sha256(key.encode()).digest()
        return cls(name or f"key-{digest.hex()[:8]}", digest)


def parse_key_line(line: str, where: str) -> Key | None:
    """One line of a keys file (None for a blank or comment line); ValueError naming `where`, never the key."""
    fields = line.split("#", 1)[0].split()
    if not fields:
        return None
    if len(fields) == 1:
        return Key.plain(fields[0])
    if not NAME.fullmatch(fields[0]):
        raise ValueError(f"{where}: expected KEY, NAME KEY or NAME sha256:HEX (a name of letters, digits, _ . -, "
                         "at most 64)")
    name, secret, options = fields[0], fields[1], fields[2:]
    limits, admin = {}, False
    for option in options:
        if option == "admin":
            admin = True
            continue
        field, _, value = option.partition("=")
        kind = {"max_active": int, "rate": float}.get(field)
        try:
            limits[field] = kind(value) if kind is not None else None
        except ValueError:
            limits[field] = None
        if limits[field] is None or limits[field] <= 0:
            raise ValueError(f"{where}: options are max_active=N and rate=R (positive numbers) and admin")
    hashed = DIGEST.fullmatch(secret)
    digest = bytes.fromhex(hashed.group(1)) if hashed else Key.plain(secret).digest
    return Key(name, digest, Limits(**limits), admin)


def load_keys(keys: Iterable[str] = (), keys_file: str | None = None, env: str = "") -> list[Key]:
    """Keys from flags, a file (see the module docstring) and an env value (comma-separated), de-duplicated."""
    out = [Key.plain(k.strip()) for k in keys if k.strip()]
    if keys_file:
        for number, line in enumerate(Path(keys_file).read_text().splitlines(), 1):
            key = parse_key_line(line, f"{keys_file}:{number}")
            if key is not None:
                out.append(key)
    out += [Key.plain(k.strip()) for k in env.split(",") if k.strip()]
    return list(dict.fromkeys(out))


def presented_key(authorization: str) -> str:
    """The key in an `authorization: Key <key>` value (fal's clients) or `Bearer <key>` (OpenAI's), or ""."""
    if isinstance(authorization, str):
        for scheme in ("Key ", "Bearer "):
            if authorization.startswith(scheme):
                return authorization[len(scheme):].strip()
    return ""


class ApiKeys:
    def __init__(self, keys: Iterable[str | Key] = ()):
        self._keys = [key if isinstance(key, Key) else Key.plain(key) for key in keys]

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def key_of(self, authorization: str) -> Key | None:
        """The configured key presented, or None."""
        presented = presented_key(authorization)
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found = None
        for key in self._keys:
            if hmac.compare_digest(digest, key.digest) and found is None:
                found = key
        return found if presented else None

    def name_of(self, authorization: str) -> str | None:
        """The name of the configured key presented, or None."""
        key = self.key_of(authorization)
        return key.name if key is not None else None

    def viewer(self, authorization: str) -> str | None:
        """Whose requests a call may see: its tenant's name, or None for all of them (no keys configured, or an
        admin key)."""
        key = self.key_of(authorization)
        if not self.required or (key is not None and key.admin):
            return None
        return key.name if key is not None else "\0nobody"  # no configured key: no request is its own

    def proves(self, authorization: str) -> bool:
        """A configured key was presented (what opens a result without a signature)."""
        return self.name_of(authorization) is not None

    def allows(self, authorization: str) -> bool:
        """The call may go on: no key is required, or a configured one was presented."""
        return not self.required or self.proves(authorization)

    def tenant(self, authorization: str) -> str:
        """Who a call is from: the presented key's name ("" when no keys are configured, or none matched)."""
        return self.name_of(authorization) or ""

    def limits(self, tenant: str) -> Limits:
        """A tenant's limits (none for the empty tenant or unlimited keys)."""
        return next((key.limits for key in self._keys if key.name == tenant and key.limits != Limits()), Limits())
