"""The merge engine: records from many streams, released in timestamp order up to a watermark.

Pure code: the caller feeds parsed records and the time, and writes what comes back.

Each stream promises nothing about the future except through its *low-water mark*: the newest
timestamp it has sent (a stream is in capture order), or, when it is idle, the worker's clock
minus the allowed delay. Everything at or below the minimum mark of the live streams can be
written. Work is done per batch, not per record: a pushed batch is sorted once (Timsort makes
an already-sorted list one linear pass in C), released prefixes are cut with one bisect, and the
released runs of all streams are merged by one stable sort, which keeps ties in stream order.
"""

from __future__ import annotations

import heapq
from bisect import bisect_right
from dataclasses import dataclass
from itertools import islice
from operator import itemgetter

from ddump.pcap import Record

_TS = itemgetter(0)
FOREVER = 2**63


@dataclass
class StreamState:
    """What the merger knows of one stream."""

    name: str
    live: bool = True
    started: bool = False  # its first connection attempt has answered (or failed)
    timed: bool = True  # live: the clock bounds what it can still send; a file has no clock
    clock_offset_ns: int = 0  # worker clock minus ours
    delay_ns: int = 0  # how much later than others its packets may come (batch captures)
    newest_ns: int = -1  # newest timestamp pushed
    pushed: int = 0
    late: int = 0


class Merger:
    """Buffers records of many streams and releases them in timestamp order."""

    def __init__(self) -> None:
        self.streams: list[StreamState] = []
        self._pending: list[list[Record]] = []
        self._unsorted: list[bool] = []
        self.written_ns = -1  # timestamp of the newest record released
        self.buffered = 0

    def add_stream(self, name: str, *, timed: bool = True, delay_ns: int = 0) -> int:
        """Register a stream; its index orders ties between streams.

        An untimed stream (a file) holds the others back until it has sent a later record. A
        timed stream with a delay may deliver a packet that much later than the others do.
        """
        self.streams.append(StreamState(name, started=not timed, timed=timed, delay_ns=delay_ns))
        self._pending.append([])
        self._unsorted.append(False)
        return len(self.streams) - 1

    def start_stream(self, stream: int, clock_offset_ns: int = 0) -> None:
        """The stream's capture has started (or its first attempt failed).

        Until then nothing is released: a stream that is still connecting could send records
        from any time, and we do not know its clock yet. The connect timeout bounds this wait.
        """
        state = self.streams[stream]
        state.started = True
        state.clock_offset_ns = clock_offset_ns

    def end_stream(self, stream: int) -> None:
        """The stream will send nothing more: it no longer holds the others back."""
        self.streams[stream].live = False

    def push(self, stream: int, records: list[Record]) -> list[Record]:
        """Buffer a batch; return its records that are already late, to be written at once.

        A late record has a timestamp below one already written: it is never dropped, but it
        cannot be put in its place any more.
        """
        if not records:
            return []
        state = self.streams[stream]
        records.sort(key=_TS)
        state.pushed += len(records)
        late: list[Record] = []
        if records[0][0] < self.written_ns:
            cut = bisect_right(records, self.written_ns - 1, key=_TS)
            late = records[:cut]
            records = records[cut:]
            state.late += len(late)
        if records:
            pending = self._pending[stream]
            if pending and records[0][0] < pending[-1][0]:
                self._unsorted[stream] = True
            pending.extend(records)
            self.buffered += len(records)
            state.newest_ns = max(state.newest_ns, records[-1][0])
        return late

    def watermark(self, now_ns: int, max_delay_ns: int) -> int:
        """The newest timestamp that every live stream has moved past (FOREVER if none is live)."""
        mark = FOREVER
        idle_mark = now_ns - max_delay_ns
        for state in self.streams:
            if state.live and not state.started:
                return -1
            # A stream may still send more records at its newest timestamp (ties are common
            # with microsecond inputs): only what is older than that is settled.
            if state.live and not state.timed:
                mark = min(mark, state.newest_ns - 1)
            elif state.live:
                idle = idle_mark - state.delay_ns + state.clock_offset_ns
                mark = min(mark, max(state.newest_ns - 1, idle))
        return mark

    def oldest_mark(self, count: int) -> int:
        """The timestamp up to which `count` of the buffered records lie (the oldest ones)."""
        oldest = heapq.merge(*([ts for ts, _ in pending] for pending in self._sorted()))
        return next(islice(oldest, count - 1, None), FOREVER)

    def _sorted(self) -> list[list[Record]]:
        for index, pending in enumerate(self._pending):
            if self._unsorted[index]:
                pending.sort(key=_TS)
                self._unsorted[index] = False
        return self._pending

    def release(self, watermark: int) -> list[Record]:
        """Take every buffered record with a timestamp at or below `watermark`, in order."""
        if not self.buffered:
            return []
        runs = 0
        out: list[Record] = []
        for pending in self._sorted():
            if not pending or pending[0][0] > watermark:
                continue
            if pending[-1][0] <= watermark:
                out.extend(pending)
                pending.clear()
            else:
                cut = bisect_right(pending, watermark, key=_TS)
                out.extend(pending[:cut])
                del pending[:cut]
            runs += 1
        if runs > 1:
            out.sort(key=_TS)
        if out:
            self.buffered -= len(out)
            self.written_ns = max(self.written_ns, out[-1][0])
        return out

    def drain(self) -> list[Record]:
        """Everything still buffered, in order (at the end of the capture)."""
        return self.release(FOREVER)
