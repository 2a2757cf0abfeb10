"""Progress for long work, on a terminal and off it (logs, CI), and third-party warnings kept off the bars.

* `mode_for(stream, quiet)`: "bar" on a terminal, "lines" elsewhere, "off" with --quiet;
* `progress(iterable, desc, unit, mode)`: a tqdm bar, or plain lines `desc: k/n unit (elapsed s)` on
  stderr every `LINE_SECONDS` and at the end, so that a log shows the work moving;
* `routed_warnings()`: Python warnings and log records become one line each, written through
  `tqdm.write` (above the bars, never inside one).
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from typing import Iterable, Iterator

from tqdm import tqdm

LINE_SECONDS = 10.0  # how often a plain progress line is written off a terminal
MODES = ("bar", "lines", "off")


def mode_for(stream=None, quiet: bool = False) -> str:
    if quiet:
        return "off"
    stream = stream or sys.stderr
    return "bar" if hasattr(stream, "isatty") and stream.isatty() else "lines"


class _Lines:
    """The part of tqdm's interface the callers use, writing plain lines instead of a bar."""

    def __init__(self, iterable, desc: str, unit: str, total: int | None, every: float):
        self.iterable, self.desc, self.unit, self.every = iterable, desc, unit, every
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.shown = 0  # the count of the last line written

    def set_postfix_str(self, s: str) -> None:
        self.postfix = s

    def set_postfix(self, **kw) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def _line(self, k: int) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        tail = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {k}{of} {self.unit} ({time.monotonic() - self.start:.0f}s{tail})", file=sys.stderr,
              flush=True)
        self.last, self.shown = time.monotonic(), k

    def __iter__(self) -> Iterator:
        k = 0
        for item in self.iterable:
            yield item
            k += 1
            if time.monotonic() - self.last >= self.every:
                self._line(k)
        if k and k != self.shown:
            self._line(k)

    def close(self) -> None:
        pass


def progress(iterable: Iterable, desc: str, unit: str, mode: str = "bar", total: int | None = None,
             leave: bool = True, every: float | None = None):
    """A progress wrapper over `iterable` for `mode` (see the module docstring)."""
    if mode == "lines":
        return _Lines(iterable, desc, unit, total, LINE_SECONDS if every is None else every)
    return tqdm(iterable, desc=desc, unit=unit, total=total, leave=leave, disable=mode != "bar", file=sys.stderr)


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(f"{record.levelname.lower()}: {record.getMessage().strip().splitlines()[0]}", file=sys.stderr)


@contextlib.contextmanager
def routed_warnings():
    """Warnings and WARNING+ log records as single lines above the progress bars, each shown once."""
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
        if text not in seen:
            seen.add(text)
            tqdm.write(f"warning: {text}", file=sys.stderr)

    root = logging.getLogger()
    handler = _TqdmHandler(logging.WARNING)
    saved_handlers = root.handlers[:]
    with warnings.catch_warnings():
        warnings.showwarning = show
        root.handlers = [handler]
        try:
            yield
        finally:
            root.handlers = saved_handlers
