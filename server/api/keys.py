"""API keys: `Authorization: Key <key>` (an HTTP header, or gRPC metadata), checked in one place for every port.

Keys are compared with hmac.compare_digest against every configured key (no early exit), so timing says nothing
about how much of a key was right. Keys are never logged. No key configured: no authentication.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path


def load_keys(keys: Iterable[str] = (), keys_file: str | None = None, env: str = "") -> list[str]:
    """Keys from flags, a file (one a line, # comments) and an env value (comma-separated), de-duplicated."""
    out: list[str] = [k.strip() for k in keys if k.strip()]
    if keys_file:
        for line in Path(keys_file).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                out.append(line)
    out += [k.strip() for k in env.split(",") if k.strip()]
    return list(dict.fromkeys(out))


def presented_key(authorization: str) -> str:
    """The key in an `authorization: Key <key>` value, or ""."""
    if isinstance(authorization, str) and authorization.startswith("Key "):
        return authorization[4:].strip()
    return ""


class ApiKeys:
    def __init__(self, keys: Iterable[str] = ()):
        self._keys = [key.encode() for key in keys]

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def proves(self, authorization: str) -> bool:
        """A configured key was presented (what opens a result without a signature)."""
        presented = presented_key(authorization).encode()
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(presented, key)
        return ok and bool(presented)

    def allows(self, authorization: str) -> bool:
        """The call may go on: no key is required, or a configured one was presented."""
        return not self.required or self.proves(authorization)
