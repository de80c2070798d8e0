"""A request's states, as the proto, the store and the scheduler all spell them."""

from __future__ import annotations

import enum


class State(str, enum.Enum):
    IN_QUEUE = "IN_QUEUE"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"

    def __str__(self) -> str:
        return self.value


TERMINAL = (State.COMPLETED, State.FAILED, State.CANCELED)

IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED, CANCELED = (State.IN_QUEUE.value, State.IN_PROGRESS.value,
                                                      State.COMPLETED.value, State.FAILED.value, State.CANCELED.value)
