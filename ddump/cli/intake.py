"""Records in: each chunk a target sends decoded, put in the output's link type, merged and
released in order up to the watermark."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

from ddump import records as batches
from ddump.cli.files import FileSource
from ddump.cli.output import OutputClosed
from ddump.cli.runs import LIVE, TICK_S, Run, SessionParts, is_pulled
from ddump.cli.sources import StreamFailure
from ddump.decode import DecodeError, Segment
from ddump.errors import DdumpError, PcapFormatError
from ddump.pcap import (
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    can_convert,
    convert_records,
    linktype_name,
    output_linktype,
)
from ddump.records import Records
from ddump.targets import redact

_COOKED = {LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2}  # what `tcpdump -i any` gives


class Intake(SessionParts):
    """Decodes what targets send and releases it, in order, to the output."""

    def _on_data(self, run: Run, chunk: bytes) -> Awaitable[None] | None:
        run.counts.bytes += len(chunk)
        packets = run.counts.packets
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
        if self.stopping:
            return None
        drained = self.output.drained()
        if drained is not None or is_pulled(run.target):
            return drained
        now = time.monotonic()
        since, run.last_read = now - run.last_read, now
        if self.pacer.busy(run.counts.packets - packets, since):
            return self.pacer.next_turn()
        return None

    def _accept(self, run: Run, segment: Segment | None) -> None:
        if run.linktype is None and run.decoder.linktype is not None:
            run.linktype = run.decoder.linktype
            run.opened_at = None
            self._awaiting_header.discard(run.index)
            if run.clock_known:  # else its first packet starts it (_learn_clock)
                self.merger.start_stream(run.index, run.clock_offset_ns)
            self._start_pcapng(run)
        if segment is None or not segment.records or self.stopping or run.refused:
            return
        records = segment.records
        if self._cutoff_ns is not None and isinstance(run.target, LIVE):
            # In the worker's clock, by the offset's low end: the worker reads its clock just
            # before it answers, so that end is off by the answer's way here (well under a
            # millisecond on a LAN). The high end adds the whole request, tcpdump's start
            # included (measured 34-74 ms on an idle host): a cut that late, different per target.
            cutoff = self._cutoff_ns + run.clock_offset_ns
            records = batches.pack([record for record in records if record[0] <= cutoff])
            if not records:
                return
        run.counts.packets += len(records)
        if isinstance(run.target, LIVE) and (
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
        if not is_pulled(run.target):  # the files' reader releases after a round of reads
            self._release_soon()

    def _push(self, run: Run, records: Records, linktype: int) -> None:
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

    def _push_records(self, run: Run, records: Records) -> None:
        try:
            self._write(self.merger.push(run.index, records))
        except DdumpError as exc:
            self._output_failed(exc)

    def _output_failed(self, exc: DdumpError) -> None:
        if not isinstance(exc, OutputClosed) and self.fatal is None:
            self.fatal = exc
        self.stop(str(exc))

    def _start_pcapng(self, run: Run) -> None:
        linktype, snaplen = run.decoder.linktype, run.decoder.snaplen
        if self.output.pcapng is None or linktype is None or snaplen is None:
            return
        target, opened = run.target, run.opened
        is_worker = isinstance(target, LIVE)
        self.output.pcapng.start_target(
            run.index,
            name=target.name,
            description=redact(target.url) if isinstance(target, LIVE) else target.path,
            linktype=linktype,
            snaplen=snaplen,
            interface_names=opened.interfaces if opened else None,
            filter=target.filter if isinstance(target, LIVE) else None,
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

    def _end_of_body(self, run: Run) -> None:
        try:
            run.decoder.close()
        except PcapFormatError as exc:
            raise StreamFailure(str(exc)) from None  # it says where the stream was cut
        if not run.decoder.started:
            what = "file" if isinstance(run.target, FileSource) else "response"
            raise StreamFailure(f"the {what} ended before a capture header")

    def _release_soon(self) -> None:
        """Release once every stream that read in this pass of the event loop has pushed."""
        if not self._release_due:
            self._release_due = True
            asyncio.get_running_loop().call_soon(self._release_now)

    def _release_now(self) -> None:
        self._release_due = False
        self._release()

    def _release(self) -> None:
        if self.output.closed:
            return
        self._choose_linktype()
        if self.merger.buffered + self.staged > self.hold_cap:
            self._stop_waiting_for_silent_streams()
        now_ns = time.time_ns()
        mark = watermark = self.merger.watermark(now_ns, self.settings.max_delay_ns)
        if self.merger.buffered > self.hold_cap and mark < self.merger.pulled_mark():
            # A quiet stream without a clock (stdin, a FIFO) holds the others back for as long
            # as it is quiet: past the bound, the oldest half goes out anyway; what that stream
            # sends later from before them is written late (counted), never dropped. Never
            # past a pulled file's next record: files stay exact.
            oldest = self.merger.oldest_mark(self.merger.buffered - self.hold_cap // 2)
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
                    f"more than {self.hold_cap} packets held back for {waiting_for}: writing "
                    "the oldest; what those send later from before them will be written late"
                )
        try:
            self._write(self.merger.release(mark))
        except DdumpError as exc:
            self._output_failed(exc)
        if self.merger.buffered or self.staged:  # to be released as time goes on
            wait_s = self._release_wait_s(now_ns, watermark)
            self._tick_by(TICK_S if wait_s is None else wait_s)

    def _release_wait_s(
        self, now_ns: int | None = None, watermark: int | None = None
    ) -> float | None:
        """Seconds until the clock alone lets the oldest held record out (None: not the clock's
        to settle: a stream must send more). `watermark`: the one just taken at `now_ns`."""
        if now_ns is None:
            now_ns = time.time_ns()
        wait_ns = self.merger.wait_ns(now_ns, self.settings.max_delay_ns, watermark)
        return None if wait_ns is None else wait_ns / 1e9

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
        # After the startup grace, or past the hold cap (memory stays bounded), a
        # stream that has not sent its pcap header yet (still connecting, say) no longer holds
        # the others: its mark follows the clock like a quiet stream's.
        for run in self.runs:
            if not self.merger.streams[run.index].started:
                run.opened_at = None
                self._awaiting_header.discard(run.index)
                self.merger.start_stream(run.index, run.clock_offset_ns)
