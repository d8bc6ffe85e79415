"""A capture session: every target streamed at once, merged live into one pcap."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from ddump.cli.drops import DropCounts
from ddump.cli.ends import (
    RECENT_CONNECT_TIMEOUT_S,
    RECENT_LOSS_S,
    UNASKED_END,
    AskedEnd,
    asked_end,
    retry_delay,
)
from ddump.cli.files import FileSource, FileStream
from ddump.cli.intake import Intake
from ddump.cli.openings import Openings
from ddump.cli.output import Output, OutputClosed
from ddump.cli.pacer import Pacer
from ddump.cli.pulled import FilePuller
from ddump.cli.report import Gap, Reporter, TargetCounts
from ddump.cli.runs import (
    HOLD_PER_TARGET,
    LIVE,
    MAX_BUFFERED,
    Run,
    SessionSettings,
    decoder_for,
    delivery_delay_ns,
    is_pulled,
)
from ddump.cli.sources import StreamFailure, StreamStalled
from ddump.cli.ticker import Ticker
from ddump.cli.tls import ContextCache
from ddump.cli.unread import UnreadProbe
from ddump.errors import DdumpError
from ddump.merge import Merger
from ddump.ssh_targets import SshTarget
from ddump.targets import Target

if TYPE_CHECKING:
    from ddump.cli.ssh import SshStream
    from ddump.cli.stream import CaptureStream


class Session(Intake, FilePuller, DropCounts, Ticker, Openings):
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
        self.unread = UnreadProbe()
        self.merger = Merger(unread=self.unread.streams)
        # A capture file has no clock: it is merged by its timestamps alone.
        self.runs = [
            Run(
                self.merger.add_stream(
                    t.name,
                    timed=isinstance(t, LIVE),
                    delay_ns=delivery_delay_ns(t),
                    pulled=is_pulled(t),
                ),
                t,
                TargetCounts(t.name),
            )
            for t in targets
        ]
        self.stopping = False
        self.stop_reason = ""
        self.staged = 0  # records held until the output's link type is known
        self.hold_cap = max(MAX_BUFFERED, HOLD_PER_TARGET * len(self.runs))
        self._awaiting_header: set[int] = set()
        self._warned_full = False
        self.pacer = Pacer()
        self._tick_wake: asyncio.Future[None] | None = None  # the ticker's sleep, if it sleeps
        self._tick_at = 0.0  # loop time it ends
        self._tick_timer: asyncio.TimerHandle | None = None
        self._release_due = False
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
            if not is_pulled(r.target)
        ]
        files = [r for r in self.runs if is_pulled(r.target)]
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
            self.unread.close()
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

    async def _stream_target(self, run: Run) -> None:
        delay: float | None = None
        lost_at: float | None = None  # loop time its last capture was lost
        loop = asyncio.get_running_loop()
        while not self.stopping:
            run.decoder = decoder_for(run.target)
            run.linktype = None
            run.opened = None
            run.stream = self._open(run)
            if lost_at is not None and loop.time() - lost_at < RECENT_LOSS_S:
                self._connect_soon(run)
            packets = run.counts.packets
            try:
                try:
                    await run.stream.run(
                        functools.partial(self._reopened, run),
                        functools.partial(self._on_data, run),
                    )
                finally:
                    self._take_ssh_counts(run)
                    self._take_final_stats(run)
                if run.refused:
                    raise StreamFailure(run.refused)
                if self.stopping:
                    break
                self._end_of_body(run)
                self._check_end(run, run.counts.packets - packets)
                run.counts.state = "ended"
                if isinstance(run.target, LIVE):
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
            if isinstance(run.target, LIVE) and not run.answered:
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

    def _connect_soon(self, run: Run) -> None:
        # Retrying a target that was healthy moments ago: an attempt begun while its link was
        # down must not wait out TCP's SYN backoff once the link is back.
        from ddump.cli.stream import CaptureStream

        if isinstance(run.stream, CaptureStream):
            run.stream.retry_quickly(RECENT_CONNECT_TIMEOUT_S)

    def _never_answered(self, run: Run) -> str:
        from ddump.cli.stream import CaptureStream

        if isinstance(run.stream, CaptureStream) and run.stream.answered:
            return "never started: the worker answered, but its tcpdump had not started yet"
        if isinstance(run.stream, CaptureStream) and run.stream.connected:
            return "never answered: it took the connection, but no HTTP response came"
        if isinstance(run.target, SshTarget):
            return "never answered: its tcpdump had not started when the capture stopped"
        return "never connected before the capture stopped"

    def _check_end(self, run: Run, packets: int) -> None:
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

    def _failed(self, run: Run, message: str, silent_ns: int = 0) -> None:
        if (
            isinstance(run.target, LIVE)
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

    def _open(self, run: Run) -> CaptureStream | SshStream | FileStream:
        target = run.target
        if isinstance(target, FileSource):
            return FileStream(target)
        if isinstance(target, SshTarget):
            from ddump.cli.ssh import SshStream, shares_connection

            shared = shares_connection(target, (r.target for r in self.runs))
            return SshStream(
                target,
                self.settings.connect_timeout_s,
                shared=shared,
                unread=self.unread.slot(run.index),
            )
        # Here, not at the top: merging capture files needs no HTTP client.
        from ddump.cli.stream import CaptureStream

        return CaptureStream(
            target,
            self._tls_context(target),
            self.settings.connect_timeout_s,
            self.unread.slot(run.index),
        )

    def _tls_context(self, target: Target) -> ssl.SSLContext | None:
        if target.url.startswith("https:"):
            return self.contexts.get(target.ca, target.cert, target.key)
        return None
