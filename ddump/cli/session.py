"""A capture session: every target streamed at once, merged live into one pcap."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import resource
import ssl
import time
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from ddump import records as batches
from ddump.cli.ends import (
    RECENT_CONNECT_TIMEOUT_S,
    RECENT_LOSS_S,
    UNASKED_END,
    AskedEnd,
    asked_end,
    retry_delay,
)
from ddump.cli.files import FileReader, FileSource, FileStream
from ddump.cli.output import Output, OutputClosed
from ddump.cli.report import Gap, Reporter, TargetCounts
from ddump.cli.sources import Opened, StreamFailure, StreamStalled
from ddump.cli.tls import ContextCache
from ddump.decode import CaptureDecoder, DecodeError, PcapDecoder, Segment
from ddump.errors import DdumpError, PcapFormatError
from ddump.merge import Merger
from ddump.pcap import (
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    can_convert,
    convert_records,
    linktype_name,
    output_linktype,
)
from ddump.pcapng import CaptureCounts
from ddump.protocol import BATCH_DELAY_NS, BATCH_PARAM, flag_value
from ddump.records import Records
from ddump.ssh_targets import SshTarget
from ddump.targets import Target, redact

if TYPE_CHECKING:
    from ddump.cli.ssh import SshStream
    from ddump.cli.stream import CaptureStream

TICK_S = 0.02
STATUS_EVERY_S = 1.0
STARTUP_GRACE_S = 1.0  # at most this (or --max-delay, if longer) waiting for targets to start
MAX_BUFFERED = 200_000  # records held for ordering: about 300 MB of 1500-byte packets
_COOKED = {LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2}  # what `tcpdump -i any` gives
STATS_TIMEOUT_S = 2.0  # for every worker to tell tcpdump's counts at the end
STATS_CONCURRENCY = 16  # asks at once (--reconnect may leave many captures per target)
_LIVE = (Target, SshTarget)  # captures, with a clock: a worker's, or tcpdump's over SSH
# A pulled file keeps at most one read block beyond what the merge can write: the blocks of
# all files together stay within this, each between these bounds.
FILE_BLOCKS_BUDGET = 64 * 1024 * 1024
FILE_BLOCK_MIN, FILE_BLOCK_MAX = 16 * 1024, 256 * 1024
FILE_YIELD_EVERY = 8  # blocks pulled between two turns of the event loop


@dataclass(frozen=True)
class SessionSettings:
    max_delay_ns: int
    connect_timeout_s: float
    count: int | None = None
    duration_ns: int | None = None
    reconnect: bool = False


@dataclass
class _Run:
    """One target during the session."""

    index: int
    target: Target | SshTarget | FileSource
    counts: TargetCounts
    decoder: CaptureDecoder | PcapDecoder = field(default_factory=PcapDecoder)
    stream: CaptureStream | SshStream | FileStream | None = None
    linktype: int | None = None
    clock_offset_ns: int = 0  # worker clock minus ours: at least this...
    clock_offset_high_ns: int = 0  # ...and at most this (a round trip above the headers' low)
    opened_at: float | None = None  # loop time of the 200, while its pcap header is awaited
    opened: Opened | None = None
    staged: list[tuple[int, Records]] = field(default_factory=list)  # (link type, records)
    failed: bool = False
    refused: str = ""  # why its records cannot join the output, once known
    clock_known: bool = True  # False: no clock header; the first packet tells its offset
    last_ts: int = -1  # a file's newest timestamp so far, in file order
    capture_ids: list[str] = field(default_factory=list)  # one per connection (--reconnect)
    tcpdump: CaptureCounts | None = None  # tcpdump's counts, summed over its captures
    answered: bool = False  # some capture of it ran (a 200 came)
    capturing_since: float = 0.0  # loop time of the current capture's 200
    stalled_captures: set[str] = field(default_factory=set)  # capture ids whose connection stalled


class Session:
    """Streams every target, merges, writes; `run()` returns whether any target failed."""

    def __init__(
        self,
        targets: list[Target | SshTarget | FileSource],
        contexts: ContextCache,
        output: Output,
        reporter: Reporter,
        settings: SessionSettings,
    ) -> None:
        self.contexts = contexts
        self.output = output
        self.reporter = reporter
        self.settings = settings
        self.merger = Merger()
        # A capture file has no clock: it is merged by its timestamps alone.
        self.runs = [
            _Run(
                self.merger.add_stream(
                    t.name,
                    timed=isinstance(t, _LIVE),
                    delay_ns=_delivery_delay_ns(t),
                    pulled=_pulled(t),
                ),
                t,
                TargetCounts(t.name),
            )
            for t in targets
        ]
        self.stopping = False
        self.stop_reason = ""
        self.staged = 0  # records held until the output's link type is known
        self._warned_full = False
        self._stop_timer: asyncio.TimerHandle | None = None
        self._cutoff_ns: int | None = None  # the time of a stop that waits for batch targets
        self._stop_event = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.fatal: DdumpError | None = None
        self._started_ns = time.time_ns()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def run(self) -> bool:
        """Capture until every stream ends or `stop()`; True when some target failed or has
        gaps (the capture is partial)."""
        self._started_ns = time.time_ns()
        self.reporter.timestamps = True
        streams = [
            self._spawn(self._stream_target(r), f"stream {r.target.name}")
            for r in self.runs
            if not _pulled(r.target)
        ]
        files = [r for r in self.runs if _pulled(r.target)]
        if files:
            streams.append(self._spawn(self._pull_files(files), "capture files"))
        ticker = self._spawn(self._tick(), "ticker")
        if self.settings.duration_ns is not None:
            asyncio.get_running_loop().call_later(
                self.settings.duration_ns / 1e9, self.stop_after_batches, "duration reached"
            )
        try:
            await asyncio.gather(*streams)
        finally:
            ticker.cancel()
            await self._finish()
        if self.fatal is not None:
            raise self.fatal
        return any(r.failed or r.counts.gaps for r in self.runs)

    async def _finish(self) -> None:
        """Write what is buffered, in order, end the file validly, and sum up."""
        await self._collect_tcpdump_counts()  # first: pcapng ends with them
        self._warn_of_drops()
        if not self.output.closed:
            try:
                self._choose_linktype()
                self._write(self.merger.drain())
                # Counts only where every capture of the target told them: a partial sum
                # would pass for the whole.
                self.output.finish(
                    {
                        r.index: r.tcpdump
                        for r in self.runs
                        if r.tcpdump and not r.counts.dropped_unknown
                    }
                )
                await self.output.flush()
            except DdumpError:
                pass  # kept in output.error
        else:
            await self.output.flush()  # it may still run something (-z on the last file)
        self._take_output_error()
        self.reporter.clear_status()
        self.reporter.timestamps = False
        late = sum(s.late for s in self.merger.streams)
        for r in self.runs:
            r.counts.late = self.merger.streams[r.index].late
        written = self.output.records
        self.reporter.summary(
            [r.counts for r in self.runs], written, late, self.output.where, time.time_ns()
        )

    async def _collect_tcpdump_counts(self) -> None:
        """Ask each worker for tcpdump's counts: its kernel drops are packets nobody will see."""
        asks = [
            (run, target, capture_id)
            for run in self.runs
            if isinstance(target := run.target, Target)
            for capture_id in run.capture_ids
        ]
        if not asks:
            return
        self.reporter.status(f"asking the workers for tcpdump's counts ({len(asks)} captures)")
        room = asyncio.Semaphore(STATS_CONCURRENCY)

        async def ask(target: Target, capture_id: str) -> CaptureCounts:
            async with room:
                return await self._tcpdump_counts(target, capture_id)

        tasks = [asyncio.ensure_future(ask(target, id_)) for _, target, id_ in asks]
        _, late = await asyncio.wait(tasks, timeout=STATS_TIMEOUT_S)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        for (run, target, capture_id), task in zip(asks, tasks, strict=True):
            error = "no answer in time" if task in late else task.exception()
            if error is not None:
                run.counts.dropped_unknown += 1
                self.reporter.detail(f"{target.name}: no drop counts from the worker: {error}")
                continue
            answer, known = task.result(), run.tcpdump or CaptureCounts()
            if answer.dropped is None:  # tcpdump was killed before it could count
                run.counts.dropped_unknown += 1
            run.tcpdump = CaptureCounts(
                _add(known.received, answer.received), _add(known.dropped, answer.dropped)
            )
            run.counts.dropped = run.tcpdump.dropped
            if capture_id in run.stalled_captures:
                run.counts.dropped_while_stalled += answer.dropped or 0

    def _warn_of_drops(self) -> None:
        lost = [r.counts for r in self.runs if r.counts.dropped_while_stalled]
        if lost:
            # Their tcpdump was blocked behind the dead connection until the worker noticed
            # it: no sign of load, and capturing less would not have saved them. (They may
            # outnumber the gap's packets: that tcpdump can outlive the gap.)
            where = ", ".join(f"{c.name}: {c.dropped_while_stalled}" for c in lost)
            self.reporter.warn(
                f"{sum(c.dropped_while_stalled for c in lost)} packets were dropped by the kernel "
                f"for captures whose connection stalled ({where}): their tcpdump was blocked "
                "behind it, which is no sign of load; what the capture lacks is the gap below"
            )
        dropped = [c for r in self.runs if (c := r.counts).dropped and c.dropped_by_load]
        if not dropped:
            return
        total = sum(c.dropped_by_load for c in dropped)
        at_least = "at least " if any(c.dropped_unknown for c in dropped) else ""
        where = ", ".join(f"{c.name}: {c.dropped_by_load}" for c in dropped)
        self.reporter.warn(
            f"{at_least}{total} packets were dropped by the kernel before tcpdump could take "
            f"them ({where}): capture less (-s 200, a narrower filter), use --batch if a "
            "second of delay is fine, or give ddump-worker a larger --buffer-size"
        )

    async def _tcpdump_counts(self, target: Target, capture_id: str) -> CaptureCounts:
        from ddump.cli.stream import fetch_stats, stats_target

        timeout = min(STATS_TIMEOUT_S, self.settings.connect_timeout_s)
        answer = await fetch_stats(
            stats_target(target, capture_id), self._tls_context(target), timeout
        )
        return CaptureCounts(
            received=_count(answer, "received"), dropped=_count(answer, "dropped_by_kernel")
        )

    def _take_output_error(self) -> None:
        # A reader that went away is a normal end (`| head`); any other write error is not.
        error = self.output.error
        if error is not None and not isinstance(error, OutputClosed) and self.fatal is None:
            self.fatal = error

    @property
    def waiting_for_batches(self) -> bool:
        """A stop was asked for and waits for batch targets (see stop_after_batches)."""
        return self._stop_timer is not None and not self.stopping

    def stop_after_batches(self, reason: str) -> None:
        """Stop, but first let batch targets hand over what they captured until now.

        A batch capture's kernel hands over its current block at the latest 1 s after it
        began: waiting that long (and --max-delay for the way here) loses nothing captured
        before the stop. Nothing captured after it is written, from any worker target.
        """
        if self.stopping or self._stop_timer is not None:
            return
        wait_ns = max(
            (
                self.merger.streams[r.index].delay_ns
                for r in self.runs
                if r.counts.state == "capturing" and self.merger.streams[r.index].live
            ),
            default=0,
        )
        if not wait_ns:
            self.stop(reason)
            return
        self._cutoff_ns = time.time_ns()  # what is captured later is not written
        wait_s = (wait_ns + self.settings.max_delay_ns) / 1e9
        again = "again " if reason == "SIGINT" else ""
        self.reporter.info(
            f"{reason}: stopping in {wait_s:g} s, once batch targets have handed over "
            f"their last packets (Ctrl-C {again}to stop now)"
        )
        self._stop_timer = asyncio.get_running_loop().call_later(wait_s, self.stop, reason)

    def stop(self, reason: str) -> None:
        """End the session: close every stream (the workers stop their tcpdump)."""
        if self.stopping:
            return
        self.stopping = True
        self.stop_reason = reason
        if self._stop_timer is not None:
            self._stop_timer.cancel()
        self.reporter.detail(f"stopping: {reason}")
        self._stop_event.set()
        for r in self.runs:
            if r.stream is not None:
                r.stream.close()
        self.output.wake_all()  # streams waiting for room must see the close

    async def _stream_target(self, run: _Run) -> None:
        delay: float | None = None
        lost_at: float | None = None  # loop time its last capture was lost
        loop = asyncio.get_running_loop()
        while not self.stopping:
            run.decoder = _decoder(run.target)
            run.linktype = None
            run.opened = None
            run.stream = self._open(run.target)
            if lost_at is not None and loop.time() - lost_at < RECENT_LOSS_S:
                self._connect_soon(run)
            packets = run.counts.packets
            try:
                try:
                    await run.stream.run(
                        lambda opened: self._reopened(run, opened),
                        lambda chunk: self._on_data(run, chunk),
                    )
                finally:
                    self._take_ssh_counts(run)
                if run.refused:
                    raise StreamFailure(run.refused)
                if self.stopping:
                    break
                self._end_of_body(run)
                self._check_end(run, run.counts.packets - packets)
                run.counts.state = "ended"
                if isinstance(run.target, _LIVE):
                    self.reporter.info(f"{run.target.name}: ended ({run.counts.packets} packets)")
                break
            except StreamFailure as exc:
                if self.stopping and not run.failed:
                    break
                self._failed(run, str(exc), exc.silent_ns if isinstance(exc, StreamStalled) else 0)
            except Exception as exc:  # a bug must cost one target, not the whole capture
                self._failed(run, f"internal error: {type(exc).__name__}: {exc}")
            if not self.settings.reconnect or self.stopping:
                break
            just_lost = run.opened is not None  # it was capturing: a restart or a blip?
            if just_lost:
                lost_at = loop.time()
            since = None if lost_at is None else loop.time() - lost_at
            delay, previous = retry_delay(delay, since, just_lost), delay
            run.counts.state = "retrying"
            say = self.reporter.detail if delay == previous else self.reporter.info
            say(f"{run.target.name}: retrying in {delay:g} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_event.wait(), delay)
        if self.stopping and run.counts.state in ("capturing", "connecting", "retrying"):
            if isinstance(run.target, _LIVE) and not run.answered:
                # It never captured: whatever the stop, its part of the capture is missing.
                if not run.failed:
                    self._failed(run, self._never_answered(run))
                run.counts.state = "failed"
            else:
                run.counts.state = "stopped"
        self.merger.end_stream(run.index)
        self._release()
        if all(s.live is False for s in self.merger.streams):
            self._stop_event.set()

    async def _pull_files(self, runs: list[_Run]) -> None:
        """Merge regular files exactly, as mergecap does: always read the file whose records
        end earliest, the one that holds the merge back; no cap, no guess, nothing late."""
        size = max(FILE_BLOCK_MIN, min(FILE_BLOCK_MAX, FILE_BLOCKS_BUDGET // len(runs)))
        keep_open = len(runs) <= _open_files_room()
        readers: dict[int, FileReader] = {}
        for run in runs:
            assert isinstance(run.target, FileSource)
            readers[run.index] = FileReader(run.target, size, keep_open=keep_open)
            run.decoder = _decoder(run.target)
            self._on_opened(run, Opened(clock_offset_ns=None))
        # (newest timestamp pushed, index): files not read yet first, in argument order.
        heap = [(-1, run.index) for run in runs]
        pulled = 0
        # One release per block read would visit ~every file each time: measured merging
        # 1,000 files, 78 files cut per release; releasing after a round of reads merges
        # the same records in far fewer, larger steps. Memory stays within a round's blocks.
        release_every = max(1, len(runs) // 8)
        try:
            while heap and not self.stopping:
                if not self._files_may_grow():
                    await asyncio.sleep(TICK_S)  # until a live target moves the merge on
                    continue
                _, index = heapq.heappop(heap)
                run, reader = self.runs[index], readers[index]
                if self._pull(run, reader):
                    heapq.heappush(heap, (self.merger.streams[index].newest_ns, index))
                else:
                    reader.close()
                    self.merger.end_stream(index)
                    self._release()
                pulled += 1
                if pulled % release_every == 0 or self.merger.buffered > MAX_BUFFERED // 2:
                    self._release()
                pending = None if self.stopping else self.output.drained()
                if pending is not None:
                    await pending
                elif pulled % FILE_YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # the ticker, signals and live targets go on
        finally:
            for reader in readers.values():
                reader.close()
        for run in runs:
            if run.counts.state == "capturing":
                run.counts.state = "stopped"
            self.merger.end_stream(run.index)
        self._report_file_order(runs)
        self._release()

    def _files_may_grow(self) -> bool:
        """Read more of the files while they hold the merge back, or memory is to spare.

        A live target that holds the merge (a quiet stdin, a worker still connecting) must
        not make the files pile up in memory: past MAX_BUFFERED they wait for it.
        """
        if self.merger.buffered + self.staged <= MAX_BUFFERED:
            return True
        now = time.time_ns()
        return self.merger.watermark(now, self.settings.max_delay_ns) >= self.merger.pulled_mark()

    def _pull(self, run: _Run, reader: FileReader) -> bool:
        """Read and merge one block of a file; False once the file is done (or failed)."""
        try:
            # Compressed input held back inflates first: a bounded piece per pull.
            block = b"" if run.decoder.more else reader.read()
            if block or run.decoder.more:
                self._on_data(run, block)
                return True
            self._end_of_body(run)
            run.counts.state = "ended"
        except StreamFailure as exc:
            self._failed(run, str(exc))
        except Exception as exc:  # a bug must cost one file, not the whole merge
            self._failed(run, f"internal error: {type(exc).__name__}: {exc}")
        return False

    def _check_file_order(self, run: _Run, records: Records) -> None:
        # A file that is out of time order itself (a capture of several interfaces, a clock
        # step): its records are sorted within each read block; counted for the summary.
        first = batches.first_ts(records)
        if first >= run.last_ts and getattr(records, "sorted", None) is True:
            run.last_ts = batches.last_ts(records)
            return
        previous = run.last_ts
        for ts in batches.timestamps(records):
            if ts < previous:
                run.counts.disordered += 1
            else:
                previous = ts
        run.last_ts = previous

    def _report_file_order(self, runs: list[_Run]) -> None:
        for run in runs:
            if run.counts.disordered:
                self.reporter.warn(
                    f"{run.target.name}: {run.counts.disordered} records earlier than the one "
                    "before them in the file itself: sorted within each block read, and any "
                    "older than what was already written were written where they came, counted "
                    "late (reordercap sorts a file)"
                )

    def _connect_soon(self, run: _Run) -> None:
        # Retrying a target that was healthy moments ago: an attempt begun while its link was
        # down must not wait out TCP's SYN backoff once the link is back.
        from ddump.cli.stream import CaptureStream

        if isinstance(run.stream, CaptureStream):
            run.stream.retry_quickly(RECENT_CONNECT_TIMEOUT_S)

    def _never_answered(self, run: _Run) -> str:
        from ddump.cli.stream import CaptureStream

        if isinstance(run.stream, CaptureStream) and run.stream.connected:
            return "never answered: it took the connection, but no HTTP response came"
        if isinstance(run.target, SshTarget):
            return "never answered: its tcpdump had not started when the capture stopped"
        return "never connected before the capture stopped"

    def _check_end(self, run: _Run, packets: int) -> None:
        """A live capture may end only as it asked (count, duration): else it failed."""
        target = run.target
        if isinstance(target, SshTarget):
            asked = AskedEnd(target.count, target.duration_ns)
            unasked = "its tcpdump ended unasked (was it stopped on that host?)"
        elif isinstance(target, Target):
            asked, unasked = asked_end(target.url), UNASKED_END
        else:
            return  # a file's or a pipe's end is the end of its capture
        elapsed_ns = int((asyncio.get_running_loop().time() - run.capturing_since) * 1e9)
        if not asked.reached(packets, elapsed_ns):
            raise StreamFailure(unasked)

    def _reopened(self, run: _Run, opened: Opened) -> None:
        """A capture of the target runs (again): the gap before it, if any, ends now."""
        failed, error = run.failed, run.counts.error
        self._on_opened(run, opened)
        run.capturing_since = asyncio.get_running_loop().time()
        now = time.time_ns()
        gaps = run.counts.gaps
        if gaps and gaps[-1].end_ns is None:
            gaps[-1] = replace(gaps[-1], end_ns=now)
            lost_s = (now - gaps[-1].start_ns) / 1e9
            self.reporter.info(f"{run.target.name}: back after {lost_s:.1f} s not captured")
        elif failed and not run.answered and isinstance(run.target, _LIVE):
            # It failed at first: it was not captured from the start until now.
            gaps.append(Gap(self._started_ns, now, error))
        run.answered = True

    def _failed(self, run: _Run, message: str, silent_ns: int = 0) -> None:
        if (
            isinstance(run.target, _LIVE)
            and run.opened is not None
            and not (run.counts.gaps and run.counts.gaps[-1].end_ns is None)
        ):
            # A capture was running: what the worker captured from the moment the stream went
            # silent until a new capture runs never reaches us.
            run.counts.gaps.append(Gap(time.time_ns() - silent_ns, None, message))
            if silent_ns and run.opened.capture_id is not None:
                run.stalled_captures.add(run.opened.capture_id)
        # Retrying, the same failure again and again is said once (-v: each time).
        again = run.failed and message == run.counts.error
        run.failed = True
        self.merger.start_stream(run.index, run.clock_offset_ns)
        run.counts.state = "failed"
        run.counts.error = message
        (self.reporter.detail if again else self.reporter.error)(f"{run.target.name}: {message}")

    def _take_ssh_counts(self, run: _Run) -> None:
        """tcpdump's exit counts, which an SSH target's stream read from its stderr."""
        if not isinstance(run.target, SshTarget) or not run.opened:
            return
        answer = getattr(run.stream, "capture_counts", None)
        if answer is None or answer.dropped is None:
            run.counts.dropped_unknown += 1
        known = run.tcpdump or CaptureCounts()
        if answer is not None:
            run.tcpdump = CaptureCounts(
                _add(known.received, answer.received), _add(known.dropped, answer.dropped)
            )
            run.counts.dropped = run.tcpdump.dropped

    def _open(
        self, target: Target | SshTarget | FileSource
    ) -> CaptureStream | SshStream | FileStream:
        if isinstance(target, FileSource):
            return FileStream(target)
        if isinstance(target, SshTarget):
            from ddump.cli.ssh import SshStream

            return SshStream(target, self.settings.connect_timeout_s)
        # Here, not at the top: merging capture files needs neither Tornado nor the network.
        from ddump.cli.stream import CaptureStream

        return CaptureStream(target, self._tls_context(target), self.settings.connect_timeout_s)

    def _tls_context(self, target: Target) -> ssl.SSLContext | None:
        if target.url.startswith("https:"):
            return self.contexts.get(target.ca, target.cert, target.key)
        return None

    def _on_opened(self, run: _Run, opened: Opened) -> None:
        run.counts.state = "capturing"
        run.failed = False
        run.counts.error = ""
        offset = opened.clock_offset_ns
        run.clock_offset_ns = offset or 0
        run.clock_known = offset is not None or isinstance(run.target, FileSource)
        if not run.clock_known:
            run.counts.no_clock = True
        run.clock_offset_high_ns = run.clock_offset_ns + (
            opened.clock_spread_ns if offset is not None else 0
        )
        run.opened = opened
        run.opened_at = asyncio.get_running_loop().time()
        if opened.capture_id is not None:
            run.capture_ids.append(opened.capture_id)
        note = ""
        if offset is not None:
            # The worker reads its clock just before it answers: the low end is the estimate.
            note = f", clock offset {offset / 1e6:+.1f} ms"
            self._check_clock(run, offset, offset + opened.clock_spread_ns)
        if isinstance(run.target, FileSource):
            self.reporter.detail(f"{run.target.name}: reading")
            return
        what = f"filter {run.target.filter!r}" if run.target.filter else "no filter"
        if not run.clock_known:
            note = ", no clock: ordered by its packets' own timestamps"
        self.reporter.info(f"{run.target.name}: capturing ({what}{note})")

    def _check_clock(self, run: _Run, low: int, high: int) -> None:
        limit = self.settings.max_delay_ns
        if low <= limit and high >= -limit:
            return
        gap = low if low > limit else -high
        self.reporter.warn(
            f"{run.target.name}: its clock is at least {gap / 1e9:.3f} s "
            f"{'ahead of' if low > limit else 'behind'} this host, more than --max-delay "
            f"({limit / 1e9:g} s): synchronize clocks (NTP) or raise --max-delay, or its "
            "packets will be written late"
        )

    def _learn_clock(self, run: _Run, newest_ns: int) -> None:
        # A packet cannot arrive before it was captured: each batch's newest timestamp minus
        # our time bounds the worker's clock offset from below, better than the headers did.
        # Without a clock header, the first packet gives the first bound: a replayed trace or
        # a clock minutes off then merges by its own timestamps, not all at once.
        low = newest_ns - time.time_ns()
        if low > run.clock_offset_ns or not run.clock_known:
            run.clock_known = True
            run.clock_offset_ns = low
            self.merger.start_stream(run.index, low)

    def _on_data(self, run: _Run, chunk: bytes) -> Awaitable[None] | None:
        run.counts.bytes += len(chunk)
        decoder = run.decoder
        truncated = decoder.truncated
        try:
            segments = decoder.feed(chunk)
            while decoder.more:  # compressed input, inflated a bounded piece at a time
                for segment in segments:
                    self._accept(run, segment)
                segments = decoder.feed(b"")
        except DecodeError as exc:
            for segment in exc.segments:  # the good records before the bad bytes
                self._accept(run, segment)
            raise StreamFailure(str(exc)) from None  # it says what the bytes are
        except PcapFormatError as exc:
            raise StreamFailure(str(exc)) from None
        finally:
            run.counts.truncated += decoder.truncated - truncated
        for segment in segments:
            self._accept(run, segment)
        if not segments:
            self._accept(run, None)  # a header alone starts the stream
        if run.refused:
            raise StreamFailure(run.refused)
        return None if self.stopping else self.output.drained()

    def _accept(self, run: _Run, segment: Segment | None) -> None:
        if run.linktype is None and run.decoder.linktype is not None:
            run.linktype = run.decoder.linktype
            run.opened_at = None
            if run.clock_known:  # else its first packet starts it (_learn_clock)
                self.merger.start_stream(run.index, run.clock_offset_ns)
            self._start_pcapng(run)
        if segment is None or not segment.records or self.stopping or run.refused:
            return
        records = segment.records
        if self._cutoff_ns is not None and isinstance(run.target, _LIVE):
            # In the worker's clock, by the offset's low end: the worker reads its clock just
            # before it answers, so that end is off by the answer's way here (well under a
            # millisecond on a LAN). The high end adds the whole request, tcpdump's start
            # included (measured 34-74 ms on an idle host): a cut that late, different per target.
            cutoff = self._cutoff_ns + run.clock_offset_ns
            records = batches.pack([record for record in records if record[0] <= cutoff])
            if not records:
                return
        run.counts.packets += len(records)
        if isinstance(run.target, _LIVE) and (
            self.merger.streams[run.index].started or not run.clock_known
        ):
            self._learn_clock(run, batches.last_ts(records))
        elif isinstance(run.target, FileSource):
            self._check_file_order(run, records)
        pcapng = self.output.pcapng
        if pcapng is not None:
            # pcapng keeps every target's own link type: records become EPBs right away.
            if segment.interface is not None:
                encoded = pcapng.encode_input(run.index, segment.interface, records)
            else:
                encoded = pcapng.encode(run.index, records)
            self._push_records(run, encoded)
        elif self.output.linktype is None:
            run.staged.append((segment.linktype, records))
            self.staged += len(records)
            self._choose_linktype()
        else:
            self._push(run, records, segment.linktype)
        if not _pulled(run.target):  # the files' reader releases after a round of reads
            self._release()

    def _push(self, run: _Run, records: Records, linktype: int) -> None:
        assert self.output.linktype is not None
        out = self.output.linktype
        if linktype != out:
            if not can_convert(linktype, out):
                fix = (
                    "write --format pcapng, which keeps each one's own"
                    if isinstance(run.target, FileSource)
                    else "capture it separately"
                )
                run.refused = (
                    f"its link type {linktype_name(linktype)} cannot be merged into the "
                    f"output's {linktype_name(out)}: {fix}"
                )
                run.counts.packets -= len(records)
                if run.counts.state == "ended":  # its task is over: nobody else will say it
                    self._failed(run, run.refused)
                if run.stream is not None:
                    run.stream.close()
                return
            records = convert_records(records, linktype, out)
        self._push_records(run, records)

    def _push_records(self, run: _Run, records: Records) -> None:
        try:
            self._write(self.merger.push(run.index, records))
        except DdumpError as exc:
            self._output_failed(exc)

    def _output_failed(self, exc: DdumpError) -> None:
        if not isinstance(exc, OutputClosed) and self.fatal is None:
            self.fatal = exc
        self.stop(str(exc))

    def _start_pcapng(self, run: _Run) -> None:
        linktype, snaplen = run.decoder.linktype, run.decoder.snaplen
        if self.output.pcapng is None or linktype is None or snaplen is None:
            return
        target, opened = run.target, run.opened
        is_worker = isinstance(target, _LIVE)
        self.output.pcapng.start_target(
            run.index,
            name=target.name,
            description=redact(target.url) if isinstance(target, _LIVE) else target.path,
            linktype=linktype,
            snaplen=snaplen,
            interface_names=opened.interfaces if opened else None,
            filter=target.filter if isinstance(target, _LIVE) else None,
            device="any" if is_worker else None,
            start_ns=opened.worker_clock_ns if opened else None,
        )

    def _choose_linktype(self) -> None:
        """Decide the output's link type once every stream has told its own (or failed)."""
        if self.output.linktype is not None or self.output.pcapng is not None:
            return
        if any(s.live and not s.started for s in self.merger.streams) and not self.stopping:
            return
        known: list[int] = []  # staged records keep the link type they came with
        for r in self.runs:
            linktype = r.staged[0][0] if r.staged else r.linktype
            if linktype is not None:
                known.append(linktype)
        if not known:
            return
        untold = any(
            r.linktype is None and not r.staged and self.merger.streams[r.index].live
            for r in self.runs
        )
        if untold and set(known) <= _COOKED:
            # A target still to tell its own may well be LINUX_SLL2: choose that now, which
            # takes LINUX_SLL records without loss, rather than drop its interface indexes.
            self.output.linktype = LINKTYPE_LINUX_SLL2
        else:
            self.output.linktype = output_linktype(known)
        self.staged = 0
        for run in self.runs:
            staged, run.staged = run.staged, []
            for linktype, records in staged:
                self._push(run, records, linktype)

    def _end_of_body(self, run: _Run) -> None:
        try:
            run.decoder.close()
        except PcapFormatError as exc:
            raise StreamFailure(str(exc)) from None  # it says where the stream was cut
        if not run.decoder.started:
            what = "file" if isinstance(run.target, FileSource) else "response"
            raise StreamFailure(f"the {what} ended before a capture header")

    def _release(self) -> None:
        if self.output.closed:
            return
        self._choose_linktype()
        if self.merger.buffered + self.staged > MAX_BUFFERED:
            self._stop_waiting_for_silent_streams()
        mark = self.merger.watermark(time.time_ns(), self.settings.max_delay_ns)
        if self.merger.buffered > MAX_BUFFERED and mark < self.merger.pulled_mark():
            # A quiet stream without a clock (stdin, a FIFO) holds the others back for as long
            # as it is quiet: past the bound, the oldest half goes out anyway; what that stream
            # sends later from before them is written late (counted), never dropped. Never
            # past a pulled file's next record: files stay exact.
            oldest = self.merger.oldest_mark(self.merger.buffered - MAX_BUFFERED // 2)
            mark = max(mark, min(oldest, self.merger.pulled_mark()))
            if not self._warned_full:
                self._warned_full = True
                unclocked = [s for s in self.merger.streams if s.live and not s.timed]
                behind = min((s.newest_ns for s in unclocked), default=None)
                holding = [s.name for s in unclocked if s.newest_ns == behind]
                batch = [s.name for s in self.merger.streams if s.live and s.delay_ns]
                if holding:
                    waiting_for = f"quiet targets without a clock ({', '.join(holding)})"
                elif batch:
                    waiting_for = (
                        f"batch targets, whose packets come up to 1 s late ({', '.join(batch)})"
                    )
                else:
                    waiting_for = "slower targets"
                self.reporter.warn(
                    f"more than {MAX_BUFFERED} packets held back for {waiting_for}: writing "
                    "the oldest; what those send later from before them will be written late"
                )
        try:
            self._write(self.merger.release(mark))
        except DdumpError as exc:
            self._output_failed(exc)

    def _write(self, records: Records) -> None:
        if not records:
            return
        count = self.settings.count
        if count is not None:
            room = count - self.output.records
            if room <= 0:
                if self.output.pcapng is not None:
                    self.output.pcapng.discard(records)
                return
            if len(records) >= room:
                self.output.write(records[:room])
                if self.output.pcapng is not None:
                    self.output.pcapng.discard(records[room:])
                self.stop(f"{count} packets written (-c)")
                return
        self.output.write(records)

    def _stop_waiting_for_silent_streams(self) -> None:
        # After the startup grace, or past MAX_BUFFERED records (memory stays bounded), a
        # stream that has not sent its pcap header yet (still connecting, say) no longer holds
        # the others: its mark follows the clock like a quiet stream's.
        for run in self.runs:
            if not self.merger.streams[run.index].started:
                run.opened_at = None
                self.merger.start_stream(run.index, run.clock_offset_ns)

    def _start_silent_streams(self, now: float) -> None:
        # A worker sends the pcap header as soon as tcpdump starts; one that answered but stays
        # silent must not hold the others back for longer than --max-delay either.
        grace = self.settings.max_delay_ns / 1e9
        for run in self.runs:
            if run.opened_at is not None and now - run.opened_at > grace:
                run.opened_at = None
                self.merger.start_stream(run.index, run.clock_offset_ns)

    async def _tick(self) -> None:
        next_status = 0.0
        last_packets = 0
        loop = asyncio.get_running_loop()
        # Output waits for every target to start, to know its clock and link type first; but
        # a target still connecting after the grace (an unreachable host waits out the whole
        # connect timeout) is then treated like a quiet one, instead of holding everything.
        grace_ends = loop.time() + max(STARTUP_GRACE_S, self.settings.max_delay_ns / 1e9)
        while True:
            await asyncio.sleep(TICK_S)
            if grace_ends and loop.time() > grace_ends:
                grace_ends = 0.0
                self._stop_waiting_for_silent_streams()
            self._start_silent_streams(loop.time())
            self._release()
            if self.output.reader_gone():
                self._take_output_error()
                self.stop(str(self.output.error or "output closed"))
            now = loop.time()
            if self.reporter.live and now >= next_status:
                packets = self.output.records
                rate = (packets - last_packets) / STATUS_EVERY_S if next_status else 0.0
                last_packets = packets
                next_status = now + STATUS_EVERY_S
                capturing = sum(r.counts.state == "capturing" for r in self.runs)
                self.reporter.status(
                    f"{capturing}/{len(self.runs)} targets capturing, {packets} packets, "
                    f"{rate:.0f} pkt/s, {self.output.bytes / 1e6:.1f} MB{self.output.where}"
                )


def _delivery_delay_ns(target: Target | SshTarget | FileSource) -> int:
    """How much later than an immediate capture the target's packets may arrive."""
    if isinstance(target, SshTarget):
        return BATCH_DELAY_NS if target.batch else 0
    if not isinstance(target, Target):
        return 0
    query = parse_qs(urlsplit(target.url).query, keep_blank_values=True)
    return BATCH_DELAY_NS if flag_value(query.get(BATCH_PARAM, ["0"])[-1]) else 0


def _decoder(target: Target | SshTarget | FileSource) -> CaptureDecoder | PcapDecoder:
    """Files hold any format ddump reads; a live capture stream is pcap."""
    return CaptureDecoder() if isinstance(target, FileSource) else PcapDecoder()


def _pulled(target: Target | SshTarget | FileSource) -> bool:
    return isinstance(target, FileSource) and target.pulled


def _open_files_room() -> int:
    """How many capture files may stay open at once, within the soft `ulimit -n`."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft - 64 if soft != resource.RLIM_INFINITY else 1 << 20


def _count(answer: dict[str, object], key: str) -> int | None:
    value = answer.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _add(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else a + b
