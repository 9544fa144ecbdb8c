"""A blocking call in a kept thread of its own (omerowebd/threads.py)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from omerowebd import threads


def test_calls_answer_in_turn_and_an_error_is_an_answer() -> None:
    worker: threads.OwnThread[object] = threads.OwnThread("test")

    def fails() -> object:
        raise OSError(5, "Input/output error")

    async def main() -> list[object]:
        return [await worker.run(int, "7", on_error=repr), await worker.run(fails, on_error=lambda e: e.strerror)]

    assert asyncio.run(main()) == [7, "Input/output error"]


def test_the_thread_ends_when_idle_and_the_next_call_starts_another(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "IDLE_EXIT", 0.05)
    worker: threads.OwnThread[threading.Thread] = threads.OwnThread("test")

    async def one() -> threading.Thread:
        return await worker.run(threading.current_thread, on_error=lambda e: None)  # type: ignore[arg-type,return-value]

    first = asyncio.run(one())
    deadline = time.monotonic() + 30
    while first.is_alive() and time.monotonic() < deadline:  # idle: it ends on its own
        first.join(0.05)
    assert not first.is_alive() and worker._thread is None
    second = asyncio.run(one())  # and a later call still gets an answer
    assert second is not first and second.daemon


def test_a_thread_that_cannot_start_is_tried_again_at_the_next_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """The unit's task limit refuses a thread once: that call fails, the next one starts a thread and answers."""
    worker: threads.OwnThread[int] = threads.OwnThread("test")
    real_start = threading.Thread.start

    def refused(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    async def main() -> int:
        monkeypatch.setattr(threading.Thread, "start", refused)
        with pytest.raises(RuntimeError):
            worker.run(int, "1", on_error=lambda e: -1)
        assert worker._thread is None
        monkeypatch.setattr(threading.Thread, "start", real_start)
        return await asyncio.wait_for(worker.run(int, "7", on_error=lambda e: -1), 30)

    assert asyncio.run(main()) == 7
