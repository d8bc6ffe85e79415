"""Everything ddump tells the user, on stderr: events, a live status line, the summary."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TextIO

from ddump.targets import redact


@dataclass
class TargetCounts:
    """Per-target figures for the status line and the summary."""

    name: str
    state: str = "connecting"  # connecting, capturing, retrying, ended, failed, stopped
    packets: int = 0
    bytes: int = 0
    late: int = 0
    disordered: int = 0  # a file's records earlier than the one before them in the file
    no_clock: bool = False  # a live target that sent no clock: ordered by its packets alone
    truncated: int = 0  # records longer than their snaplen or 262144 bytes, cut to it
    dropped: int | None = None  # by the worker's kernel, as tcpdump counted (None: not known)
    dropped_unknown: int = 0  # captures (one per connection) whose counts did not come
    error: str = ""


class Reporter:
    """One line per event; a status line that redraws in place when stderr is a terminal.

    Messages are best effort: a closed stderr (`2>&-`) or one whose reader went away
    (`2>&1 | head -1`) silences them, and the capture goes on.
    """

    def __init__(self, stream: TextIO | None = None, *, quiet: bool, verbose: bool) -> None:
        # sys.stderr is None when ddump was started with file descriptor 2 closed.
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.verbose = verbose
        self.live = self._isatty() and not quiet
        self._status_shown = False

    def _isatty(self) -> bool:
        try:
            return self.stream is not None and self.stream.isatty()
        except (OSError, ValueError):
            return False

    def _emit(self, text: str) -> None:
        if self.stream is None:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # EPIPE, EBADF, closed file: nobody reads them any more
            self.stream = None
            self.live = False

    def _line(self, text: str) -> None:
        self.clear_status()
        self._emit(redact(text) + "\n")

    def info(self, text: str) -> None:
        if not self.quiet:
            self._line(f"ddump: {text}")

    def detail(self, text: str) -> None:
        if self.verbose and not self.quiet:
            self._line(f"ddump: {text}")

    def warn(self, text: str) -> None:
        self._line(f"ddump: warning: {text}")

    def error(self, text: str) -> None:
        self._line(f"ddump: {text}")

    def status(self, text: str) -> None:
        if self.live:
            self._status_shown = True
            self._emit("\r\x1b[K" + redact(text))

    def clear_status(self) -> None:
        if self._status_shown:
            self._status_shown = False
            self._emit("\r\x1b[K")

    def summary(self, counts: list[TargetCounts], written: int, late: int, where: str = "") -> None:
        """`where`: " to 5 files, the last x.pcap4" when the output says more than -w did."""
        if self.quiet:
            return
        width = max((len(c.name) for c in counts), default=0)
        late_note = f", {late} of them late" if late else ""
        lines = [f"ddump: {written} packets written{where}{late_note}"]
        for c in counts:
            what = f"{c.packets} packets, {c.bytes} bytes"
            if c.late:
                what += f", {c.late} late"
            if c.disordered:
                what += f", {c.disordered} out of order in the file"
            if c.no_clock:
                what += ", no clock"
            if c.truncated:
                what += f", {c.truncated} longer than the snaplen, cut to it"
            if c.dropped is not None:
                at_least = "at least " if c.dropped_unknown else ""
                what += f", {at_least}{c.dropped} dropped by the kernel"
            state = c.state + (f": {c.error}" if c.error else "")
            lines.append(f"  {c.name:<{width}}  {what}  [{state}]")
        for line in lines:
            self._line(line)
