"""Request ids and result file names: exactly what the server issues and the engine writes, nothing else.

Every id and file name from outside is checked here before it reaches a query, a path or an object key.
"""

from __future__ import annotations

import re
import uuid

from engine.vocabulary import is_result_file_name  # result files are named by the engine's rule, checked by it

__all__ = ["is_request_id", "is_result_file_name", "new_request_id"]

# Request ids are exactly what new_request_id() makes.
_REQUEST_ID = re.compile(r"[0-9a-f]{32}")


def new_request_id() -> str:
    return uuid.uuid4().hex


def is_request_id(value: str) -> bool:
    return isinstance(value, str) and _REQUEST_ID.fullmatch(value) is not None

