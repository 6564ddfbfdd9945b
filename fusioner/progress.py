"""Say what a long step is doing, on stderr: one line per step, a counter over many items.

On a terminal the counter rewrites one line in place; anywhere else (a log file, CI, a pipe) it
prints a plain line at most every ``every`` seconds and at the end, so a log holds a few readable
lines instead of megabytes of carriage returns.
"""

from __future__ import annotations

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
