"""A blocking call that may hang (a hung NFS mount) run where it can hold nothing up."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Hashable
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


K = TypeVar("K", bound=Hashable)


class NoAnswer(Exception):
    """A look gave no answer in the time a caller waits: ``seconds`` since it began."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no answer for {seconds:.0f}s")
        self.seconds = seconds


class Look(Generic[T]):
    """One look under way or done: its answer to come, when it began and ended (monotonic)."""

    def __init__(self, future: asyncio.Future[T]) -> None:
        self.future = future
        self.began = time.monotonic()
        self.ended: float | None = None
        future.add_done_callback(self._end)

    def _end(self, _: asyncio.Future[T]) -> None:
        self.ended = time.monotonic()


class Looks(Generic[K, T]):
    """Looks at things that may hang (a store on a hung NFS mount): one at a time per thing.

    Each thing is looked at in a kept thread of its own (``OwnThread``): a check
    every few seconds starts no thread, and a look that hangs holds only that
    thread, none of the loop's pool (which reloads and crash restarts need). The
    next caller waits on the hanging look again, never starts a second one beside
    it. A caller waits at most ``within`` seconds after the look began, then gets
    ``NoAnswer``; a look that ended less than ``max_age`` seconds ago is the answer
    again (a status flood looks once).
    """

    def __init__(self, name: str, call: Callable[[K], T], on_error: Callable[[Exception], T]) -> None:
        self.name = name
        self._call = call
        self._on_error = on_error
        self._looks: dict[K, Look[T]] = {}
        self._threads: dict[K, OwnThread[T]] = {}

    async def answer(self, thing: K, *, within: float, max_age: float = 0.0) -> T:
        """What a look at ``thing`` found (an exception in it: ``on_error``'s answer); ``NoAnswer`` in time."""
        look = self._looks.get(thing)
        if look is None or look.future.get_loop() is not asyncio.get_running_loop() or (
                look.ended is not None and time.monotonic() - look.ended >= max_age):
            thread = self._threads.get(thing)
            if thread is None or (look is not None and not look.future.done()):  # it hangs, in another loop
                thread = self._threads[thing] = OwnThread(self.name)
            look = self._looks[thing] = Look(thread.run(self._call, thing, on_error=self._on_error))
        try:
            return await asyncio.wait_for(asyncio.shield(look.future),
                                          max(0.0, within - (time.monotonic() - look.began)))
        except asyncio.TimeoutError:
            raise NoAnswer(time.monotonic() - look.began) from None
