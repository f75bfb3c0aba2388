"""Work that belongs to no request: started outside the context of the call that caused it.

In an async actor Ray keeps the running call's task id in a context variable, and a task
or callback started from that call copies it: every Ray call made from it is then that
call's child. Cancelling the call (Serve does when an HTTP client hangs up) cancels its
children too, so a grant stream, a replica channel, a heartbeat loop or a batch of
releases that happened to start during one request would be cancelled with it: other
callers' requests fail, a release is lost and its lease held for good. Checked on Ray
2.60: a stream opened from a task created inside a call is cancelled with the call; one
created in an empty context lives on.

So such work starts here, in a context of its own (also free of the request's trace).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def spawn(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """Start ``coro`` as a task of its own, not a child of the current call."""
    return asyncio.get_running_loop().create_task(coro, context=contextvars.Context())


def soon(callback: Callable[[], object], delay_s: float = 0.0) -> None:
    """Call ``callback`` on the next loop turn (or after ``delay_s``), outside the current
    call's context."""
    loop = asyncio.get_running_loop()
    if delay_s:
        loop.call_later(delay_s, callback, context=contextvars.Context())
    else:
        loop.call_soon(callback, context=contextvars.Context())
