"""What every HTTP route that takes work shares: a JSON body read within bounds, and the caller's going away."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import Any

from starlette.requests import ClientDisconnect, Request

from server.api.limits import MAX_REQUEST_BYTES


class BodyRefused(Exception):
    """A body not taken: `status` 413 (too large) or 422 (not JSON), `field` "body"."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.field = status, "body"


class ClientGone(Exception):
    """The caller closed the connection before its answer was made."""


def integral(value: Any) -> Any:
    """JSON has one number type: 14.0 is the integer 14 (as JSON Schema, fal's and OpenAI's validation have it)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


async def read_json(request: Request) -> Any:
    """The body as JSON ({} when empty), read at most MAX_REQUEST_BYTES whatever Content-Length claims."""
    too_large = BodyRefused(413, f"the request body is larger than {MAX_REQUEST_BYTES >> 20} MB")
    declared = request.headers.get("content-length", "0")
    if not (declared.isascii() and declared.isdigit()) or int(declared) > MAX_REQUEST_BYTES:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_REQUEST_BYTES:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:  # gone before its body arrived (or cut off for sending it too slowly)
        raise ClientGone() from None
    try:
        return json.loads(b"".join(chunks) or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise BodyRefused(422, "is not valid JSON") from None
    except RecursionError:  # nested deeper than the parser goes: no input of ours is nested past 2 levels
        raise BodyRefused(422, "is nested too deeply") from None


async def unless_gone(request: Request, work: Awaitable[Any]) -> Any:
    """`work`'s result, or ClientGone as soon as the caller disconnects (its body has been read: the next message
    from the connection is its end). uvicorn does not cancel a handler whose client went away."""
    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    doing, watching = asyncio.ensure_future(work), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({doing, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
    if not doing.done():
        doing.cancel()
        raise ClientGone()
    return doing.result()
