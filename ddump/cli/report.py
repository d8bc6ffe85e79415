"""Everything ddump tells the user, on stderr: events, a live status line, the summary."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from ddump.targets import redact


@dataclass(frozen=True)
class Gap:
    """A time a target was not captured: from its loss until a new capture ran (or the end)."""

    start_ns: int  # wall clock
    end_ns: int | None  # None: it never came back before the session ended
    cause: str


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
    dropped_while_stalled: int = 0  # of those, in captures whose connection stalled (a gap)
    error: str = ""
    gaps: list[Gap] = field(default_factory=list)

    @property
    def dropped_by_load(self) -> int:
        """Kernel drops while the connection was fine: the capture was more than it took."""
        return (self.dropped or 0) - self.dropped_while_stalled


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
        # While a capture runs, each event line tells its time of day: a gap, a failure, a
        # reconnect are then placed in the capture without guessing.
        self.timestamps = False
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

    stamp_events = True  # while `timestamps` is on

    def _event(self, text: str) -> None:
        stamp = self.timestamps and self.stamp_events
        when = f"{time_of_day(time.time_ns())} " if stamp else ""
        self._line(f"ddump: {when}{text}")

    def info(self, text: str) -> None:
        if not self.quiet:
            self._event(text)

    def detail(self, text: str) -> None:
        if self.verbose and not self.quiet:
            self._event(text)

    def warn(self, text: str) -> None:
        self._event(f"warning: {text}")

    def error(self, text: str) -> None:
        self._event(text)

    def status(self, text: str) -> None:
        if self.live:
            self._status_shown = True
            self._emit("\r\x1b[K" + redact(text))

    def clear_status(self) -> None:
        if self._status_shown:
            self._status_shown = False
            self._emit("\r\x1b[K")

    def summary(
        self,
        counts: list[TargetCounts],
        written: int,
        late: int,
        where: str = "",
        ended_ns: int | None = None,
    ) -> None:
        """The figures per target; every gap with its times and cause; whether it is partial.

        `where`: " to 5 files, the last x.pcap4" when the output says more than -w did.
        """
        if self.quiet:
            return
        ended_ns = time.time_ns() if ended_ns is None else ended_ns
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
                if c.dropped_while_stalled:
                    what += f" ({c.dropped_while_stalled} behind a stalled connection)"
            state = c.state + (f": {c.error}" if c.error else "")
            lines.append(f"  {c.name:<{width}}  {what}  [{state}]")
            lines += [f"  {'':<{width}}    {gap_text(gap, ended_ns)}" for gap in c.gaps]
        partial = [c for c in counts if c.gaps]
        if partial:
            n = sum(len(c.gaps) for c in partial)
            lost_s = sum(gap_ns(g, ended_ns) for c in partial for g in c.gaps) / 1e9
            lines.append(
                f"ddump: the capture is partial: {n} gap{'s' if n > 1 else ''}, {lost_s:.1f} s "
                f"not captured in all ({', '.join(c.name for c in partial)})"
            )
        for line in lines:
            self._line(line)


def time_of_day(ns: int) -> str:
    """`HH:MM:SS.mmm`, local time, as tcpdump prints it."""
    seconds, rest = divmod(ns, 10**9)
    return time.strftime("%H:%M:%S", time.localtime(seconds)) + f".{rest // 10**6:03d}"


def gap_ns(gap: Gap, ended_ns: int) -> int:
    return max(0, (ended_ns if gap.end_ns is None else gap.end_ns) - gap.start_ns)


def gap_text(gap: Gap, ended_ns: int) -> str:
    end = "the end" if gap.end_ns is None else time_of_day(gap.end_ns)
    # From the printed times, so that the duration is their difference to the millisecond.
    start_ms = gap.start_ns // 10**6
    end_ms = (ended_ns if gap.end_ns is None else gap.end_ns) // 10**6
    return (
        f"not captured from {time_of_day(gap.start_ns)} to {end} "
        f"({max(0, end_ms - start_ms) / 1000:.3f} s): {gap.cause}"
    )
