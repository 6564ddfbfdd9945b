"""Say what a long step is doing, on stderr: one line per step, a counter over many items.

On a terminal the counter rewrites one line in place; anywhere else (a log file, CI, a pipe) it
prints a plain line at most every ``every`` seconds and at the end, so a log holds a few readable
lines instead of megabytes of carriage returns.
"""

from __future__ import annotations

import io
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


def say(message: str, stream: TextIO | None = None) -> None:
    """One progress line on stderr (stdout stays for results: the paths a command wrote)."""
    stream = stream or sys.stderr
    print(message, file=stream, flush=True)


@contextmanager
def step(what: str, stream: TextIO | None = None) -> Iterator[None]:
    """``loading model runs/x ...`` before, ``... done in 12.3 s`` after (nothing after a failure)."""
    start = time.perf_counter()
    say(f"{what} ...", stream)
    yield
    say(f"{what}: done in {time.perf_counter() - start:.1f} s", stream)


class Counter:
    """``label 3/40 (photo.jpg)``: in place on a terminal, a plain line every ``every`` s otherwise."""

    def __init__(self, total: int, label: str, *, every: float = 10.0, stream: TextIO | None = None) -> None:
        self.total, self.label, self.every = total, label, every
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = self.last = time.perf_counter()
        self.done = 0

    def advance(self, item: str = "") -> None:
        self.done += 1
        now = time.perf_counter()
        line = f"{self.label} {self.done}/{self.total}" + (f" ({item})" if item else "")
        final = self.done == self.total
        if final:
            line += f", {now - self.start:.1f} s"
        if self.tty:
            self.stream.write("\r\x1b[2K" + line + ("\n" if final else ""))
            self.stream.flush()
        elif final or now - self.last >= self.every:
            say(line, self.stream)
            self.last = now


class PlainLines(io.TextIOBase):
    """A text stream for logs: progress bars' carriage-return redraws become a plain line at most
    every ``every`` seconds (and their final state); every other line passes through unchanged."""

    def __init__(self, stream: TextIO, every: float = 10.0) -> None:
        super().__init__()
        self.stream, self.every = stream, every
        self.line = ""  # the text since the last line break or carriage return
        self.latest = ""  # the newest redraw not yet printed
        self.last = -float("inf")

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def _emit(self, line: str) -> None:
        self.stream.write(line.rstrip() + "\n")
        self.stream.flush()
        self.last = time.monotonic()

    def write(self, text: str) -> int:
        for piece in re.split(r"(\r|\n)", text):
            if piece == "\r":  # a bar redraws its line: keep the newest, print it when one is due
                if self.line.strip():
                    self.latest = self.line
                    if time.monotonic() - self.last >= self.every:
                        self._emit(self.line)
                        self.latest = ""
                self.line = ""
            elif piece == "\n":
                if self.line.strip() or not self.latest:
                    self._emit(self.line)
                else:  # a bar that ended on a redraw: its final state
                    self._emit(self.latest)
                self.line = self.latest = ""
            else:
                self.line += piece
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


@contextmanager
def plain_progress(every: float = 10.0) -> Iterator[None]:
    """While inside, stderr that is not a terminal gets :class:`PlainLines` (restored on exit)."""
    original = sys.stderr
    if original is None or original.isatty():
        yield
        return
    sys.stderr = PlainLines(original, every)
    try:
        yield
    finally:
        pending = sys.stderr
        sys.stderr = original
        if isinstance(pending, PlainLines) and (pending.line.strip() or pending.latest):
            pending._emit(pending.line if pending.line.strip() else pending.latest)
