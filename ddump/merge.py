"""The merge engine: records from many streams, released in timestamp order up to a watermark.

Pure code: the caller feeds parsed records and the time, and writes what comes back.

Each stream promises nothing about the future except through its *low-water mark*: the newest
timestamp it has sent (a stream is in capture order), or, when it is idle, the worker's clock
minus the allowed delay. Everything at or below the minimum mark of the live streams can be
written. Work is done per batch, not per record (ddump/records.py): a pushed batch is put in
order (if it is not already) and kept whole, released prefixes are cut with one bisect, and the
released runs of all streams are merged in one call, which keeps ties in stream order.

A stream's idle term stands for "nothing older is on its way". It does not hold while bytes
the stream sent wait unread in our own socket: a process short of CPU reads its streams late,
and their records would all be late. The caller can say which streams have bytes unread
(`unread`); each one's mark is then its newest record until it has been read.

Nothing per call walks every stream: heaps keep the streams by their oldest buffered record
(what a release must visit), the untimed ones by their newest, and the timed ones by what
their marks are made of (_Marks), so a call costs the changes since the last one.
Measured merging 1,000 files: walking every stream for each block read took 90 % of the time.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice
from operator import itemgetter

from ddump import records as batches
from ddump.records import Records

FOREVER = 2**63
_STREAM = itemgetter(0)


@dataclass
class StreamState:
    """What the merger knows of one stream."""

    name: str
    live: bool = True
    started: bool = False  # its first connection attempt has answered (or failed)
    timed: bool = True  # live: the clock bounds what it can still send; a file has no clock
    pulled: bool = False  # a regular file, read when the merge needs it: never held past a cap
    clock_offset_ns: int = 0  # worker clock minus ours
    delay_ns: int = 0  # how much later than others its packets may come (batch captures)
    newest_ns: int = -1  # newest timestamp pushed
    pushed: int = 0
    late: int = 0


class _Newest:
    """The least `newest_ns` of a set of live streams, kept in a heap with lazy deletion: an
    entry is stale once its stream has ended or moved on (newest_ns only grows)."""

    def __init__(self, streams: list[StreamState]) -> None:
        self._streams = streams
        self._heap: list[tuple[int, int]] = []

    def update(self, stream: int) -> None:
        heapq.heappush(self._heap, (self._streams[stream].newest_ns, stream))

    def least(self) -> int | None:
        heap, streams = self._heap, self._streams
        while heap:
            newest, stream = heap[0]
            state = streams[stream]
            if state.live and state.newest_ns == newest:
                return newest
            heapq.heappop(heap)
        return None


class _Marks:
    """The least low-water mark of the live timed streams, without walking them per call.

    A stream's mark is max(newest - 1, T + offset - delay), T being now minus the max delay:
    its newest record until T passes newest - 1 - (offset - delay), its crossing point, then
    the idle term. So the streams not yet crossed are kept by newest, the crossed ones by
    offset - delay (and by newest, for crossed_below), and the crossing points in a heap that
    T pops as it grows (if it goes back, a new max delay, everything is rebuilt). Entries are
    deleted lazily: each carries its stream's version, bumped by every change; once the heaps
    hold twice the entries they can need (four per stream), they are rebuilt from the
    current ones.
    """

    def __init__(self, streams: list[StreamState]) -> None:
        self._streams = streams
        self._version: list[int] = []
        self._crossed: list[bool] = []
        self._by_newest: list[tuple[int, int, int]] = []  # (newest - 1, stream, version)
        self._by_crossing: list[tuple[int, int, int]] = []  # (crossing point, ...)
        self._by_offset: list[tuple[int, int, int]] = []  # (offset - delay, ...): crossed
        self._crossed_by_newest: list[tuple[int, int, int]] = []  # (newest - 1, ...): crossed
        self._time = -FOREVER  # the latest T
        self.limiter: int | None = None  # the stream whose mark was the least, at the latest T

    def add(self) -> None:
        self._version.append(0)
        self._crossed.append(False)

    def update(self, stream: int) -> None:
        """The stream's newest record, clock offset or liveness changed."""
        self._version[stream] = version = self._version[stream] + 1
        self._crossed[stream] = False
        state = self._streams[stream]
        if state.live:
            newest = state.newest_ns - 1
            crossing = newest - (state.clock_offset_ns - state.delay_ns)
            heapq.heappush(self._by_newest, (newest, stream, version))
            heapq.heappush(self._by_crossing, (crossing, stream, version))

    def least(self, time: int) -> int:
        """The least mark at T = `time` (FOREVER if no timed stream is live)."""
        if time < self._time:  # T went back (another max delay): start over
            self._rebuild()
        self._time = time
        version, crossed, streams = self._version, self._crossed, self._streams
        by_crossing, by_offset = self._by_crossing, self._by_offset
        while by_crossing and by_crossing[0][0] <= time:
            _, stream, seen = heapq.heappop(by_crossing)
            if seen == version[stream]:
                crossed[stream] = True
                state = streams[stream]
                heapq.heappush(by_offset, (state.clock_offset_ns - state.delay_ns, stream, seen))
                heapq.heappush(self._crossed_by_newest, (state.newest_ns - 1, stream, seen))
        mark, self.limiter = FOREVER, None
        by_newest = self._by_newest
        while by_newest:
            _, stream, seen = by_newest[0]
            if seen == version[stream] and not crossed[stream]:
                mark, self.limiter = by_newest[0][0], stream
                break
            heapq.heappop(by_newest)
        while by_offset:
            offset, stream, seen = by_offset[0]
            if seen == version[stream]:
                if time + offset < mark:
                    mark, self.limiter = time + offset, stream
                break
            heapq.heappop(by_offset)
        heaps = len(by_newest) + len(by_crossing) + len(by_offset) + len(self._crossed_by_newest)
        if heaps > 8 * len(streams) + 64:
            self._compact()
        return mark

    def crossed_below(self, mark: int) -> bool:
        """Whether a stream whose idle term makes its mark (at the latest T) has sent nothing
        newer than `mark`: only such a stream's mark is lower while it has bytes unread."""
        heap, version, crossed = self._crossed_by_newest, self._version, self._crossed
        while heap:
            newest, stream, seen = heap[0]
            if seen == version[stream] and crossed[stream]:
                return newest < mark
            heapq.heappop(heap)
        return False

    def _compact(self) -> None:
        version, crossed = self._version, self._crossed
        self._by_newest = [
            e for e in self._by_newest if e[2] == version[e[1]] and not crossed[e[1]]
        ]
        self._by_crossing = [e for e in self._by_crossing if e[2] == version[e[1]]]
        self._by_offset = [e for e in self._by_offset if e[2] == version[e[1]]]
        self._crossed_by_newest = [
            e for e in self._crossed_by_newest if e[2] == version[e[1]] and crossed[e[1]]
        ]
        for heap in (self._by_newest, self._by_crossing, self._by_offset, self._crossed_by_newest):
            heapq.heapify(heap)

    def _rebuild(self) -> None:
        self._by_newest, self._by_crossing, self._by_offset = [], [], []
        self._crossed_by_newest = []
        for stream, state in enumerate(self._streams):
            if state.timed:
                self.update(stream)


class Merger:
    """Buffers records of many streams and releases them in timestamp order."""

    def __init__(self, unread: Callable[[], Iterable[int]] | None = None) -> None:
        """`unread()`: the streams whose bytes wait unread now (see the module)."""
        self.streams: list[StreamState] = []
        self._unread = unread
        self._held_by_unread = False  # the last watermark was an unread stream's newest record
        self._marks = _Marks(self.streams)
        self._untimed = _Newest(self.streams)  # bounds the mark by their newest records
        self._pulled = _Newest(self.streams)
        self._unstarted = 0  # live streams not started: nothing is released meanwhile
        # (oldest buffered timestamp, stream) of every stream with records buffered; an entry
        # whose key is no longer the stream's `_head` is stale.
        self._heads: list[tuple[int, int]] = []
        self._head: list[int | None] = []
        self._pending: list[list[Records]] = []  # per stream: sorted batches, in order
        self._unsorted: list[bool] = []
        self.written_ns = -1  # timestamp of the newest record released
        self._settled = -1  # no buffered record is at or below this: a release up to it is void
        self.buffered = 0

    def add_stream(
        self, name: str, *, timed: bool = True, delay_ns: int = 0, pulled: bool = False
    ) -> int:
        """Register a stream; its index orders ties between streams.

        An untimed stream (a file) holds the others back until it has sent a later record. A
        timed stream with a delay may deliver a packet that much later than the others do. A
        pulled stream is one the caller reads when the merge needs it (see pulled_mark).
        """
        state = StreamState(name, started=not timed, timed=timed, delay_ns=delay_ns, pulled=pulled)
        self.streams.append(state)
        self._pending.append([])
        self._unsorted.append(False)
        self._head.append(None)
        index = len(self.streams) - 1
        self._marks.add()
        if timed:
            self._marks.update(index)
            self._unstarted += 1
        else:
            self._untimed.update(index)
            if pulled:
                self._pulled.update(index)
        return index

    def start_stream(self, stream: int, clock_offset_ns: int = 0) -> None:
        """The stream's capture has started (or its first attempt failed).

        Until then nothing is released: a stream that is still connecting could send records
        from any time, and we do not know its clock yet. The connect timeout bounds this wait.
        """
        state = self.streams[stream]
        if state.live and not state.started:
            self._unstarted -= 1
        state.started = True
        state.clock_offset_ns = clock_offset_ns
        if state.timed:
            self._marks.update(stream)

    def end_stream(self, stream: int) -> None:
        """The stream will send nothing more: it no longer holds the others back."""
        state = self.streams[stream]
        if state.live and not state.started:
            self._unstarted -= 1
        state.live = False
        if state.timed:
            self._marks.update(stream)  # its entries are stale: it holds nobody back

    def push(self, stream: int, records: Records) -> Records:
        """Buffer a batch; return its records that are already late, to be written at once.

        A late record has a timestamp below one already written: it is never dropped, but it
        cannot be put in its place any more.
        """
        if not records:
            return []
        state = self.streams[stream]
        records = batches.ordered(records)
        state.pushed += len(records)
        late: Records = []
        if batches.first_ts(records) < self.written_ns:
            cut = batches.count_upto(records, self.written_ns - 1)
            late = records[:cut]
            records = records[cut:]
            state.late += len(late)
        if records:
            first = batches.first_ts(records)
            pending = self._pending[stream]
            if pending and first < batches.last_ts(pending[-1]):
                self._unsorted[stream] = True
            pending.append(records)
            self._settled = min(self._settled, first - 1)
            self.buffered += len(records)
            head = self._head[stream]
            if head is None or first < head:
                self._head[stream] = first
                heapq.heappush(self._heads, (first, stream))
            newest = batches.last_ts(records)
            if newest > state.newest_ns:
                state.newest_ns = newest
                if state.timed:
                    self._marks.update(stream)
                else:
                    self._untimed.update(stream)
                    if state.pulled:
                        self._pulled.update(stream)
        return late

    def watermark(self, now_ns: int, max_delay_ns: int) -> int:
        """The newest timestamp that every live stream has moved past (FOREVER if none is live)."""
        if self._unstarted:
            return -1
        # A stream may still send more records at its newest timestamp (ties are common with
        # microsecond inputs): only what is older than that is settled.
        least = self._untimed.least()
        mark = FOREVER if least is None else least - 1
        # Each live timed stream: max(newest_ns - 1, now - max delay - delay + clock offset).
        mark = min(mark, self._marks.least(now_ns - max_delay_ns))
        # ... but newest_ns - 1 while bytes it sent wait unread (that is never above the max;
        # it is below the mark only for a stream whose idle term is its mark: asked only then,
        # so busy streams, one capture's included, cost no question).
        self._held_by_unread = False
        if self._unread is not None and self._marks.crossed_below(mark):
            for stream in self._unread():
                state = self.streams[stream]
                if state.live and state.timed and state.newest_ns - 1 < mark:
                    mark, self._held_by_unread = state.newest_ns - 1, True
        return mark

    def wait_ns(self, now_ns: int, max_delay_ns: int, watermark: int | None = None) -> int | None:
        """How long until the oldest buffered record may be released, if the passing of time
        alone can bring that: at least this long (0: now); None if nothing is buffered or a
        stream must send more first (an untimed one, one not started, or one whose bytes wait
        unread: reading them releases). `watermark`: the one the caller just took at `now_ns`
        (with nothing pushed since), not taken again."""
        heads, head = self._heads, self._head
        while heads and head[heads[0][1]] != heads[0][0]:
            heapq.heappop(heads)  # stale
        if not self.buffered or not heads or self._unstarted:
            return None
        oldest = heads[0][0]
        least = self._untimed.least()
        if least is not None and least - 1 < oldest:
            return None
        mark = self.watermark(now_ns, max_delay_ns) if watermark is None else watermark
        limiter = self._marks.limiter
        if mark >= oldest or limiter is None:
            return 0
        if self._held_by_unread:
            return None
        # The least mark's stream passes `oldest` once its idle term does (its newest record
        # does not move with time); another stream may then hold it, and is waited for next.
        state = self.streams[limiter]
        return max(1, oldest - (state.clock_offset_ns - state.delay_ns) - (now_ns - max_delay_ns))

    def pulled_mark(self) -> int:
        """What a release may reach without making a pulled stream's next record late.

        A pulled stream (a regular file, in time order) sends nothing older than its newest
        record: releasing past that would turn its next records into late ones.
        """
        least = self._pulled.least()
        return FOREVER if least is None else least - 1

    def oldest_mark(self, count: int) -> int:
        """The timestamp up to which `count` of the buffered records lie (the oldest ones)."""
        oldest = heapq.merge(
            *(
                [ts for batch in pending for ts in batches.timestamps(batch)]
                for pending in self._sorted()
            )
        )
        return next(islice(oldest, count - 1, None), FOREVER)

    def _sorted(self) -> list[list[Records]]:
        for index, pending in enumerate(self._pending):
            if self._unsorted[index]:
                pending[:] = [batches.ordered(batches.concat(pending))]
                self._unsorted[index] = False
        return self._pending

    def release(self, watermark: int) -> Records:
        """Take every buffered record with a timestamp at or below `watermark`, in order."""
        if not self.buffered or watermark <= self._settled:
            # Measured merging 64 files: most chunks read do not move the slowest stream's
            # mark, and returning here at once took the merge from 0.386 to 0.36 s.
            return []
        self._settled = watermark
        heads, head = self._heads, self._head
        runs: list[tuple[int, list[Records]]] = []
        while heads and heads[0][0] <= watermark:
            first, stream = heapq.heappop(heads)
            if head[stream] != first:
                continue  # stale: the stream's records were released, or an older one came
            head[stream] = None  # a second entry with the same key is stale too
            runs.append((stream, self._cut(stream, watermark)))
        for stream, _ in runs:
            pending = self._pending[stream]
            if pending:
                head[stream] = rest = batches.first_ts(pending[0])
                heapq.heappush(heads, (rest, stream))
        runs.sort(key=_STREAM)  # ties in stream order
        out = batches.merge([run for _, run in runs])
        if out:
            self.buffered -= len(out)
            self.written_ns = max(self.written_ns, batches.last_ts(out))
        return out

    def _cut(self, stream: int, watermark: int) -> list[Records]:
        """Take the stream's buffered records at or below `watermark`, in order."""
        pending = self._pending[stream]
        if self._unsorted[stream]:
            pending[:] = [batches.ordered(batches.concat(pending))]
            self._unsorted[stream] = False
        whole = 0
        while whole < len(pending) and batches.last_ts(pending[whole]) <= watermark:
            whole += 1
        run = pending[:whole]
        if whole < len(pending):
            batch = pending[whole]
            cut = batches.count_upto(batch, watermark)
            if cut:
                run.append(batch[:cut])
                pending[whole] = batch[cut:]
        del pending[:whole]
        return run

    def drain(self) -> Records:
        """Everything still buffered, in order (at the end of the capture)."""
        return self.release(FOREVER)
