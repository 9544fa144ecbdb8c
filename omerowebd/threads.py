"""A blocking call that may hang (a hung NFS mount) run where it can hold nothing up."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

IDLE_EXIT = 60.0  # seconds without a call before the thread ends (the next call starts another)


class OwnThread(Generic[T]):
    """Calls run one after another in a daemon thread of their own.

    A call that hangs holds this thread alone: no thread of the loop's pool
    (which reloads and crash restarts need), and it does not keep the process
    from exiting. The thread is kept between calls, so a check every few
    seconds starts no thread each time; it ends after IDLE_EXIT seconds
    without one. A call waits behind one that hangs: callers start a call only
    when their last one has answered.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._calls: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()  # the thread ends only when no call is queued

    def run(self, call: Callable[..., T], *args: Any, on_error: Callable[[Exception], T]) -> asyncio.Future[T]:
        """``call(*args)`` in the thread; an exception becomes ``on_error(exception)``, the future's result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._calls.put((loop, future, call, args, on_error))
        with self._guard:
            if self._thread is None:
                thread = threading.Thread(target=self._work, name=f"omerowebd-{self.name}", daemon=True)
                thread.start()  # may fail (the unit's task limit): the next call tries again
                self._thread = thread
        return future

    def _work(self) -> None:
        while True:
            try:
                loop, future, call, args, on_error = self._calls.get(timeout=IDLE_EXIT)
            except queue.Empty:
                with self._guard:
                    if self._calls.empty():
                        self._thread = None
                        return
                continue
            try:
                result = call(*args)
            except Exception as e:  # a bug or an OSError in one check must not end the watch
                result = on_error(e)
            try:
                loop.call_soon_threadsafe(_deliver, future, result)
            except RuntimeError:  # the loop closed while the call hung
                pass


def _deliver(future: asyncio.Future[T], result: T) -> None:
    if not future.done():  # nobody waits any more once the caller was cancelled
        future.set_result(result)
