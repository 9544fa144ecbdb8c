"""One line of progress on a terminal for omerowebctl's long commands.

What a person at a terminal sees while ``reload`` waits for a slow boot,
``sessions clear`` sweeps a large store or ``config import`` asks OMERO.web
about a large file: what is happening, counts where known, the time so far.
The line is redrawn in place on stderr and erased at the end, so the
command's own output is the same with or without it. Nothing at all is
written unless both stdout and stderr are terminals (piped, redirected,
under cron or systemd, or with ``--json``, a command prints exactly what it
printed before).
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

DELAY = 0.5  # seconds before the first draw: a command that is quick shows nothing
REDRAW = 0.25  # seconds between redraws: the elapsed time moves, nothing flickers
POLL = 0.5  # seconds between calls of the poll function (a status request, for reload)
ERASE = "\r\x1b[K"


def wanted(*, json: bool = False, stream: TextIO | None = None) -> bool:
    """Whether to show progress: on a terminal, and not when the output is for a program."""
    if json or os.environ.get("TERM") == "dumb":
        return False
    err = stream or sys.stderr
    try:
        return err.isatty() and sys.stdout.isatty()
    except (AttributeError, ValueError):  # a closed or odd stream
        return False


def elapsed(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds}s" if seconds < 60 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """``with Progress("sweeping") as p: p.set("sweeping: 10 files")``.

    A thread redraws the line (the text and the time since the start) while
    the command blocks on its work; ``poll``, if given, is called from that
    thread every ``poll_interval`` seconds and returns the new text (None:
    keep the old; an exception: keep the old too, progress is never the
    reason a command fails)."""

    def __init__(self, text: str, *, enabled: bool | None = None, stream: TextIO | None = None,
                 poll: Callable[[], str | None] | None = None, poll_interval: float = POLL,
                 redraw: float = REDRAW, delay: float = DELAY) -> None:
        self.stream = stream or sys.stderr
        self.enabled = wanted(stream=self.stream) if enabled is None else enabled
        self.poll = poll
        self.poll_interval = poll_interval
        self.redraw = redraw
        self.delay = delay
        self._text = text
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._drawn = False
        self._started = time.monotonic()

    def set(self, text: str) -> None:
        with self._lock:
            self._text = text

    def echo(self, text: str, file: TextIO | None = None) -> None:
        """Print a line of the command's own (a warning, say) without tearing the progress line."""
        with self._lock:
            if self._drawn:
                self._write(ERASE)
                self._drawn = False  # the next redraw puts it back under the line
            print(text, file=file or sys.stdout, flush=True)

    def __enter__(self) -> Progress:
        self._started = time.monotonic()
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            # A poll may be blocked in a request: do not wait for it (the thread
            # is a daemon thread, and draws nothing once stopped).
            self._thread.join(timeout=1)
            self._thread = None
        with self._lock:
            if self._drawn:
                self._write(ERASE)
                self._drawn = False

    def _run(self) -> None:
        next_poll = time.monotonic()
        wait = self.delay
        while not self._stop.wait(wait):
            wait = self.redraw
            if self.poll is not None and time.monotonic() >= next_poll:
                next_poll = time.monotonic() + self.poll_interval
                try:
                    text = self.poll()
                except Exception:  # noqa: BLE001 - a failed poll keeps the last line
                    text = None
                if text:
                    self.set(text)
            self._draw()

    def _draw(self) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            # One row: a line break or tab (from a reply, say) would break the redraw.
            line = " ".join(f"{self._text} ({elapsed(time.monotonic() - self._started)})".split())
            # A line longer than the terminal wraps, and \r then redraws only
            # its last row: cut it to fit.
            width = shutil.get_terminal_size((80, 24)).columns - 1
            if len(line) > width > 10:
                line = line[: width - 3] + "..."
            self._write(ERASE + line)
            self._drawn = True

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # the terminal went away: nothing to show it on
            self._stop.set()
