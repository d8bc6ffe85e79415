"""Output to rotated and compressed files (-C, -G, -W, -z, `-w x.pcap.gz` or `.zst`).

The session sees the same interface as PcapOutput's; behind it, a series of regular files,
each a whole capture on its own: a pcap header, or a pcapng section with the blocks of every
interface seen so far (the EPBs keep their interface numbers) and statistics at its end.
Records are cut between files in output order, so the files read one after another are the
merged capture. Rotation.py decides names and cuts; this module only does the I/O.

A write that fails (a full disk) cuts the file back to where it was last whole, a record or a
gzip member: what was written stays readable, and the error names the file.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import operator
import os
import subprocess
import time
from collections.abc import Callable, Mapping
from typing import Final, NoReturn

from ddump import __version__
from ddump.cli.compress import compression_of, stream_for
from ddump.cli.output import OutputClosed
from ddump.cli.report import Reporter
from ddump.cli.rotation import Plan, Rotation, records_that_fit
from ddump.errors import DdumpError
from ddump.pcap import DEFAULT_SNAPLEN, LINKTYPE_LINUX_SLL2, PcapHeader, encode_records
from ddump.pcapng import CaptureCounts, PcapngWriter, section_header
from ddump.records import Records

FLUSH_S: Final = 1.0  # a gzip member ends at least this often: what a kill -9 can lose
_EPB_INTERFACE: Final = operator.itemgetter(slice(8, 12))  # an EPB's interface id, raw
_DATA: Final = operator.itemgetter(1)


class SaveFile:
    """One file being written: what is on disk, and up to where it is a valid capture."""

    def __init__(self, path: str, *, compression: str | None) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self.gzip = stream_for(compression) if compression else None  # gzip or zstd
        self.size = 0  # capture bytes written (before compression): what -C counts
        self.records = 0
        self.started = False  # its pcap header or pcapng section header is written
        self._on_disk = 0
        self._whole = 0  # bytes on disk when it last ended with a whole record or member

    def write(self, data: bytes | memoryview) -> None:
        """Whole records or blocks; raises OSError as the disk does."""
        self.size += len(data)
        if self.gzip is None:
            self._put(data)
            self._whole = self._on_disk
        else:
            self._put(self.gzip.compress(data))

    def sync(self) -> None:
        """End the gzip member, so that everything written so far is readable."""
        if self.gzip is not None and self.gzip.pending:
            self._put(self.gzip.end_member())
            self._whole = self._on_disk

    def _put(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            self._on_disk += written
            view = view[written:]

    def close(self) -> None:
        os.close(self.fd)

    def cut_back(self) -> bool:
        """After a failed write: keep only what is whole, close; False if nothing was."""
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, self._whole)
        with contextlib.suppress(OSError):
            os.close(self.fd)
        if self._whole == 0:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            return False
        return True


class RotatingOutput:
    """Writes the capture to files as -C/-G/-W say, compressed when the name ends in .gz."""

    def __init__(
        self,
        rotation: Rotation,
        reporter: Reporter,
        refuse: Callable[[str], None] | None = None,
    ) -> None:
        """`refuse(path)` raises DdumpError for a name that must not be written (an input)."""
        self.rotation = rotation
        self.reporter = reporter
        self.refuse = refuse
        self.plan = Plan(rotation)
        self.compression = compression_of(rotation.template)
        self.pcapng: PcapngWriter | None = None
        self.section_comment: str | None = None
        self.linktype: int | None = None
        self.records = 0
        self.bytes = 0
        self.files = 0  # files finished, or started and still being written
        self.current = ""  # the name of the file being written, or of the last one
        self.error: DdumpError | None = None
        self._closed = False
        self._delivered: collections.Counter[bytes] = collections.Counter()  # pcapng: per
        # interface (its id as raw EPB bytes), the EPBs written so far, for the ISBs
        self._timer: asyncio.TimerHandle | None = None
        self._commands: set[asyncio.Task[None]] = set()
        self._file: SaveFile | None = None
        self._open(self.plan.first(time.time_ns()))  # an unwritable directory fails now

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def where(self) -> str:
        """For the status line and the summary: how many files, and the current one."""
        if self.files == 1:
            return f" to {self.current}"
        return f" to {self.files} files, the last {self.current}"

    def write(self, records: Records) -> None:
        """Write whole records, cut between files where -C says."""
        if not records:
            return
        if self._closed:
            raise self.error or OutputClosed("output closed")
        self._arm()
        try:
            self._write(records)
        except OSError as exc:
            self._failed(exc)

    def _write(self, records: Records) -> None:
        # Encoded once, then cut as bytes: a batch can be large (files merge in big ones)
        # and re-encoding what is left at every cut would cost a pass per file.
        limit = self.rotation.size
        data = memoryview(encode_records(records))
        done = at = 0  # records and bytes written so far
        while done < len(records):
            file = self._ready()
            if self.pcapng is not None:
                blocks = self.pcapng.take_blocks()
                if blocks:
                    file.write(blocks)
            rest = records[done:] if done else records
            take, size = len(rest), len(data) - at
            if limit is not None and file.size + size > limit:
                take, size = records_that_fit(file.size, limit, (len(r) for _, r in rest))
                if take == 0 and file.records == 0:
                    take, size = 1, len(rest[0][1])  # a file holds at least one record
            if take:
                file.write(data[at : at + size])
                self._count(rest[:take] if take < len(rest) else rest, size)
                file.records += take
            done += take
            at += size
            if done < len(records):
                self._end_file()
                self._open(self.plan.next_by_size())

    def _count(self, records: Records, size: int) -> None:
        self.records += len(records)
        self.bytes += size
        if self.pcapng is not None and self.rotation.rotates:
            # Each file's statistics say how many packets were written up to its end. Counted
            # by the EPBs' raw interface fields, all in C (map, itemgetter, Counter): a
            # Python loop over the records measured +20 % of the whole merge's CPU.
            self._delivered.update(map(_EPB_INTERFACE, map(_DATA, records)))

    def _delivered_counts(self) -> list[int]:
        assert self.pcapng is not None
        counts = [0] * len(self.pcapng.interfaces)
        for raw, packets in self._delivered.items():
            counts[int.from_bytes(raw, "little")] = packets
        return counts

    def finish(self, capture_counts: Mapping[int, CaptureCounts] | None = None) -> None:
        """End the last file validly (pcapng: with tcpdump's counts), even with no packet."""
        if self._closed:
            return
        try:
            self._ready()
            self._end_file(capture_counts, last=True)
        except OSError as exc:
            self._failed(exc)
        finally:
            self._disarm()

    def _ready(self) -> SaveFile:
        """The current file, its header written (the link type is known by the first write)."""
        file = self._file
        assert file is not None
        if file.started:
            return file
        file.started = True
        if self.pcapng is not None:
            self.pcapng.take_blocks()  # all of them go in below, in interface order
            header = section_header(f"ddump {__version__}", self.section_comment)
            file.write(header + b"".join(i.to_bytes() for i in self.pcapng.interfaces))
        else:
            linktype = self.linktype if self.linktype is not None else LINKTYPE_LINUX_SLL2
            file.write(PcapHeader(linktype=linktype, snaplen=DEFAULT_SNAPLEN).to_bytes())
        return file

    def _open(self, path: str) -> None:
        if self.refuse is not None:
            try:
                self.refuse(path)
            except DdumpError as exc:
                self._fail(f"{exc}; the capture stopped" if self.files else str(exc))
        try:
            self._file = SaveFile(path, compression=self.compression)
        except OSError as exc:
            self._fail(f"cannot write {path}: {exc.strerror}")
        self.files += 1
        self.current = path

    def _end_file(
        self, capture_counts: Mapping[int, CaptureCounts] | None = None, *, last: bool = False
    ) -> None:
        file = self._file
        assert file is not None
        if self.pcapng is not None:
            delivered = None if last else self._delivered_counts()
            file.write(self.pcapng.statistics(time.time_ns(), capture_counts, delivered))
        file.sync()
        file.close()
        self._file = None
        self.reporter.detail(f"{file.path}: {file.records} packets")
        if self.rotation.command is not None:
            self._run_command(self.rotation.command, file.path)

    def _failed(self, exc: OSError) -> NoReturn:
        file = self._file
        assert file is not None
        self._file = None
        kept = file.cut_back()
        what = "cut back to its last whole packet" if kept else "removed: nothing of it was whole"
        earlier = "; the files before it are complete" if self.files > 1 else ""
        self._fail(
            f"cannot write {file.path}: {exc.strerror}: the capture stopped; the file was "
            f"{what}{earlier}"
        )

    def _fail(self, message: str) -> NoReturn:
        self._closed = True
        self.error = DdumpError(message)
        self._disarm()
        raise self.error

    def _arm(self) -> None:
        if self._timer is None and not self._closed:
            self._timer = asyncio.get_running_loop().call_later(
                self._next_tick_s(time.time_ns()), self._on_timer
            )

    def _next_tick_s(self, now: int) -> float:
        # Until the next -G file is due, or a second; a due file still without its header
        # (no packet yet, so no link type) is looked at again a second later.
        due = self.plan.due_ns()
        return FLUSH_S if due is None or due <= now else min(FLUSH_S, (due - now) / 1e9)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        """Every FLUSH_S: end the gzip member; start the next -G file when one is due."""
        self._timer = None
        file = self._file
        if self._closed or file is None:
            return
        now = time.time_ns()
        due = self.plan.due_ns()
        try:
            if due is not None and now >= due and file.started:
                self._end_file()
                name = self.plan.next_by_time(now)
                if name is None:
                    self._closed = True
                    self.error = OutputClosed(f"-W {self.rotation.files}: the last file is done")
                    return
                self._open(name)
                self._ready()
            else:
                file.sync()
        except OSError as exc:
            with contextlib.suppress(DdumpError):  # kept in self.error for the session
                self._failed(exc)
            return
        except DdumpError:
            return
        self._timer = asyncio.get_running_loop().call_later(self._next_tick_s(now), self._on_timer)

    def _run_command(self, command: str, path: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(self._command(command, path), name=f"-z {path}")
        self._commands.add(task)
        task.add_done_callback(self._commands.discard)

    async def _command(self, command: str, path: str) -> None:
        # As tcpdump: `COMMAND FILE`, no shell. In a session of its own, so that the Ctrl-C
        # that stops the capture does not also stop the compression of its last file.
        try:
            process = await asyncio.create_subprocess_exec(
                command, path, stdin=subprocess.DEVNULL, start_new_session=True
            )
        except OSError as exc:
            self.reporter.warn(f"-z {command} {path}: cannot run it: {exc.strerror}")
            return
        status = await process.wait()
        if status:
            how = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
            self.reporter.warn(f"-z {command} {path} failed ({how}); the file is kept as it is")

    def drained(self) -> asyncio.Future[None] | None:
        """Regular files take every write at once: never a wait."""
        return None

    def wake_all(self) -> None:
        """Nothing ever waits for room in a file."""

    def reader_gone(self) -> bool:
        """True once the output has ended: -W files done, or a failed write."""
        return self._closed

    async def flush(self) -> None:
        """Make what was written readable, and wait for the -z commands still running."""
        if self._file is not None and not self._closed:
            try:
                self._file.sync()
            except OSError as exc:
                with contextlib.suppress(DdumpError):
                    self._failed(exc)
        if self._commands:
            self.reporter.status(f"waiting for -z {self.rotation.command} to finish")
            await asyncio.gather(*self._commands, return_exceptions=True)

    def close(self) -> None:
        self._disarm()
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):
                file.sync()
            with contextlib.suppress(OSError):
                file.close()
