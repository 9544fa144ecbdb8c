"""A blocking call that may hang (a hung NFS mount) run where it can hold nothing up."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def in_own_thread(call: Callable[..., T], *args: Any, on_error: Callable[[Exception], T]) -> asyncio.Future[T]:
    """``call(*args)`` in a new daemon thread: one that hangs holds no thread of the loop's
    pool (which reloads and crash restarts need) and does not keep the process from exiting.
    An exception becomes ``on_error(exception)``, the future's result."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(result: T) -> None:
        if not future.done():  # nobody waits any more once the caller was cancelled
            future.set_result(result)

    def work() -> None:
        try:
            result = call(*args)
        except Exception as e:  # a bug or an OSError in one check must not end the watch
            result = on_error(e)
        try:
            loop.call_soon_threadsafe(deliver, result)
        except RuntimeError:  # the loop closed while the call hung
            pass

    threading.Thread(target=work, name=f"omerowebd-{getattr(call, '__name__', 'check')}", daemon=True).start()
    return future
