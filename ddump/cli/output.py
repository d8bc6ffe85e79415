"""The one pcap we write: a global header once, then only whole records.

Pipes are written without blocking the event loop: what the reader has not taken yet waits in
a buffer, and past a high-water mark the streams stop reading (the session's data callback
returns `drained()`, which the stream awaits), so a slow reader slows the workers instead of
growing our memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import stat
import time
from collections.abc import Mapping
from typing import NoReturn, Protocol

from ddump import __version__
from ddump.errors import DdumpError
from ddump.pcap import DEFAULT_SNAPLEN, LINKTYPE_LINUX_SLL2, PcapHeader, encode_records
from ddump.pcapng import CaptureCounts, PcapngWriter, section_header
from ddump.records import Records

HIGH_WATER = 4 * 1024 * 1024


class OutputClosed(DdumpError):
    """The reader went away (`| head`, `| tcpdump -c 5`): a quiet, normal end."""


class Output(Protocol):
    """What the session writes to: PcapOutput (one file or a pipe), or rotated files."""

    pcapng: PcapngWriter | None
    section_comment: str | None
    linktype: int | None
    records: int
    bytes: int
    error: DdumpError | None

    @property
    def closed(self) -> bool: ...

    @property
    def where(self) -> str:
        """Where the capture goes, for the status line and the summary ("" if obvious)."""
        ...

    def write(self, records: Records) -> None: ...

    def finish(self, capture_counts: Mapping[int, CaptureCounts] | None = None) -> None: ...

    def drained(self) -> asyncio.Future[None] | None: ...

    def wake_all(self) -> None: ...

    def reader_gone(self) -> bool: ...

    async def flush(self) -> None: ...

    def close(self) -> None: ...


class PcapOutput:
    """Writes a nanosecond, little-endian pcap (or pcapng) to a file descriptor."""

    def __init__(self, fd: int, *, close_fd: bool = False) -> None:
        self.fd = fd
        self.close_fd = close_fd
        self.pcapng: PcapngWriter | None = None  # set: records are EPBs, see ddump/pcapng.py
        self.section_comment: str | None = None
        self.linktype: int | None = None
        self.records = 0
        self.bytes = 0
        self._header_written = False
        self._pending = bytearray()
        self._waiters: list[asyncio.Future[None]] = []
        self._closed = False
        self.error: DdumpError | None = None  # why the output closed
        mode = os.fstat(fd).st_mode
        self._pollable = not stat.S_ISREG(mode) and not stat.S_ISBLK(mode)
        self._was_blocking = os.get_blocking(fd)
        if self._pollable:
            os.set_blocking(fd, False)
        self._writer_registered = False

    @classmethod
    def open(cls, path: str) -> PcapOutput:
        """`-` is stdout; anything else is a file created or truncated."""
        if path == "-":
            if os.isatty(1):
                raise DdumpError(
                    "stdout is a terminal: pipe the capture into a reader "
                    "(ddump ... | tcpdump -nl -r -) or write it to a file with -w FILE"
                )
            return cls(1)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise DdumpError(f"cannot write {path}: {exc.strerror}") from None
        return cls(fd, close_fd=True)

    def write(self, records: Records) -> None:
        """Queue whole records (with the global header before the first)."""
        if not records:
            return
        if not self._header_written:
            self._write_header()
        if self.pcapng is not None:
            blocks = self.pcapng.take_blocks()
            if blocks:
                self._send(blocks)
        data = encode_records(records)
        self.records += len(records)
        self.bytes += len(data)
        self._send(data)

    def finish(self, capture_counts: Mapping[int, CaptureCounts] | None = None) -> None:
        """Make sure the output is a valid pcap, even if no packet came.

        pcapng ends with statistics, tcpdump's own per target where `capture_counts` has them.
        """
        if not self._header_written:
            self._write_header()
        if self.pcapng is not None:
            self._send(self.pcapng.statistics(time.time_ns(), capture_counts))

    def _write_header(self) -> None:
        self._header_written = True
        if self.pcapng is not None:
            self._send(section_header(f"ddump {__version__}", self.section_comment))
            return
        linktype = self.linktype if self.linktype is not None else LINKTYPE_LINUX_SLL2
        self._send(PcapHeader(linktype=linktype, snaplen=DEFAULT_SNAPLEN).to_bytes())

    def _send(self, data: bytes) -> None:
        if self._closed:
            raise self.error or OutputClosed("output closed")
        if self._pending:
            self._pending += data
            return
        if not self._pollable:
            # A regular file never says "later" (EAGAIN) and cannot be polled: write it all.
            view = memoryview(data)
            while view:
                view = view[self._os_write(view) :]
            return
        written = self._os_write(data)
        if written < len(data):
            self._pending += data[written:]
            self._watch_writable()

    def _os_write(self, data: bytes | bytearray | memoryview) -> int:
        try:
            return os.write(self.fd, data)
        except BlockingIOError:
            return 0
        except BrokenPipeError:
            self._fail(OutputClosed("output closed"))
        except OSError as exc:
            self._fail(DdumpError(f"cannot write the capture: {exc.strerror}"))
        raise AssertionError("unreachable")

    def _fail(self, error: DdumpError) -> NoReturn:
        self._closed = True
        self.error = error
        raise error

    def _watch_writable(self) -> None:
        if not self._writer_registered:
            asyncio.get_running_loop().add_writer(self.fd, self._on_writable)
            self._writer_registered = True

    def _on_writable(self) -> None:
        try:
            written = self._os_write(self._pending)
        except DdumpError:  # kept in self.error for the session to report
            self._pending.clear()
            self._stop_watching()
            self.wake_all()
            return
        del self._pending[:written]
        if not self._pending:
            self._stop_watching()
        if len(self._pending) < HIGH_WATER:
            self.wake_all()

    def _stop_watching(self) -> None:
        if self._writer_registered:
            asyncio.get_running_loop().remove_writer(self.fd)
            self._writer_registered = False

    def wake_all(self) -> None:
        """Let every stream waiting for room go on (room came, or the session is stopping)."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def drained(self) -> asyncio.Future[None] | None:
        """A future to await before reading more input, or None when there is room."""
        if len(self._pending) < HIGH_WATER or self._closed:
            return None
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return waiter

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def where(self) -> str:
        return ""

    def reader_gone(self) -> bool:
        """True when the pipe's reader has exited, even if we have nothing to write yet."""
        if self._closed:
            return True
        if not self._pollable:
            return False
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        for _, events in poller.poll(0):
            if events & (select.POLLERR | select.POLLHUP):
                self._closed = True
                self.error = OutputClosed("output closed")
        return self._closed

    async def flush(self) -> None:
        """Wait until everything queued has been written (or the reader is gone).

        No time limit: a reader that is alive but slow is waited for, as tcpdump would wait;
        a second Ctrl-C is the way out.
        """
        loop = asyncio.get_running_loop()
        while self._pending and not self._closed:
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, 0.05)
            self.reader_gone()

    def close(self) -> None:
        self._stop_watching()
        if self._pollable:
            with contextlib.suppress(OSError):
                os.set_blocking(self.fd, self._was_blocking)
        if self.close_fd:
            os.close(self.fd)
