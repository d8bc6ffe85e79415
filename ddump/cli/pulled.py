"""Capture files pulled by the merge: always the file whose records end earliest is read next,
so files merge exactly, like mergecap, within one read block of memory per file."""

from __future__ import annotations

import asyncio
import heapq
import resource
import time

from ddump import records as batches
from ddump.cli.files import FileReader, FileSource
from ddump.cli.runs import TICK_S, Run, SessionParts, decoder_for
from ddump.cli.sources import Opened, StreamFailure
from ddump.records import Records

# A pulled file keeps at most one read block beyond what the merge can write: the blocks of
# all files together stay within this, each between these bounds.
FILE_BLOCKS_BUDGET = 64 * 1024 * 1024
FILE_BLOCK_MIN, FILE_BLOCK_MAX = 16 * 1024, 256 * 1024
FILE_YIELD_EVERY = 8  # blocks pulled between two turns of the event loop


class FilePuller(SessionParts):
    """Reads regular capture files when the merge needs them."""

    async def _pull_files(self, runs: list[Run]) -> None:
        """Merge regular files exactly, as mergecap does: always read the file whose records
        end earliest, the one that holds the merge back; no cap, no guess, nothing late."""
        size = max(FILE_BLOCK_MIN, min(FILE_BLOCK_MAX, FILE_BLOCKS_BUDGET // len(runs)))
        keep_open = len(runs) <= _open_files_room()
        readers: dict[int, FileReader] = {}
        for run in runs:
            assert isinstance(run.target, FileSource)
            readers[run.index] = FileReader(run.target, size, keep_open=keep_open)
            run.decoder = decoder_for(run.target)
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
                if pulled % release_every == 0 or self.merger.buffered > self.hold_cap // 2:
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
        not make the files pile up in memory: past the hold cap they wait for it.
        """
        if self.merger.buffered + self.staged <= self.hold_cap:
            return True
        now = time.time_ns()
        return self.merger.watermark(now, self.settings.max_delay_ns) >= self.merger.pulled_mark()

    def _pull(self, run: Run, reader: FileReader) -> bool:
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

    def _check_file_order(self, run: Run, records: Records) -> None:
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

    def _report_file_order(self, runs: list[Run]) -> None:
        for run in runs:
            if run.counts.disordered:
                self.reporter.warn(
                    f"{run.target.name}: {run.counts.disordered} records earlier than the one "
                    "before them in the file itself: sorted within each block read, and any "
                    "older than what was already written were written where they came, counted "
                    "late (reordercap sorts a file)"
                )


def _open_files_room() -> int:
    """How many capture files may stay open at once, within the soft `ulimit -n`."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft - 64 if soft != resource.RLIM_INFINITY else 1 << 20
