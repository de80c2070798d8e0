"""Python clients for the pixart.v1 service, sync (`Client`) and asyncio (`AsyncClient`), shaped like fal's:
generate, stream, submit, status, result, cancel and subscribe(on_update=...).

Requests can be given as a pixart.v1.GenerateRequest or as keyword fields with the public API's spellings
(`image_size="square"` or `(640, 480)`, `style="Anime"`, `scheduler="SA-SOLVER"`, `output_format="jpeg"`).
The address defaults to 127.0.0.1:50051; `key` is sent as `authorization: Key <key>` metadata when given.
Errors are raised as PixArtError, which carries the status code and BadRequest field violations.

Both clients are thin layers over one core (`server.client.core`): it builds every call and makes every decision,
they only block or await.
"""

from .aio import AsyncClient
from .core import DEFAULT_ADDRESS, MAX_MESSAGE_BYTES, TERMINAL_STATES, PixArtError, make_request
from .sync import Client

__all__ = [
    "DEFAULT_ADDRESS",
    "MAX_MESSAGE_BYTES",
    "TERMINAL_STATES",
    "AsyncClient",
    "Client",
    "PixArtError",
    "make_request",
]
