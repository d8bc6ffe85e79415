"""Capture files as targets: `ddump a.pcap b.pcap` merges them, exactly, as mergecap does.

Users often already hold per-host captures; the same parser, merge and writer apply. A file has
no clock to go by, so its records are merged by their timestamps alone. A regular file is
*pulled* (FileReader): the session reads the next block of the file whose records end earliest,
so the merge never waits on, nor guesses about, a file it could simply read. Standard input and
FIFOs are *pushed* (FileStream), like a live stream: their writer may be a live tcpdump.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from ddump.cli.sources import DataCallback, Opened, OpenedCallback, StreamFailure
from ddump.errors import UsageError
from ddump.pipes import PipeReader

READ_SIZE = 256 * 1024  # measured: faster than 1 MiB, and a third of the peak memory


@dataclass(frozen=True)
class FileSource:
    """A pcap file (or `-`, standard input) to merge."""

    name: str
    path: str  # "-" is stdin
    regular: bool = False  # a regular file: pulled by the merge, not pushed

    @property
    def pulled(self) -> bool:
        return self.regular


# Names only a capture file has: a mistyped one is "no such file", not a host without http://.
CAPTURE_SUFFIXES = (".pcap", ".pcapng", ".cap", ".gz")


def looks_like_file(arg: str) -> bool:
    """A URL argument that names a capture file rather than a worker."""
    if arg == "-" or arg.startswith("file:"):
        return True
    return "://" not in arg and (os.path.exists(arg) or arg.lower().endswith(CAPTURE_SUFFIXES))


def parse_file_source(arg: str) -> FileSource:
    if arg == "-":
        return FileSource("stdin", "-")
    path = unquote(urlsplit(arg).path) if arg.startswith("file:") else arg
    if not os.path.isfile(path) and not os.path.exists(path):
        raise UsageError(f"{arg}: no such capture file")
    if os.path.isdir(path):
        raise UsageError(f"{arg}: is a directory, not a capture file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{arg}: cannot read it (permission denied)")
    return FileSource(path, path, regular=os.path.isfile(path))


class FileReader:
    """A regular capture file read a block at a time, when the merge asks for it.

    Past `open_limit` files open at once (a merge of thousands of files under a small
    `ulimit -n`), a file is opened for each read and closed after it, at its offset.
    """

    def __init__(self, source: FileSource, block_size: int, *, keep_open: bool = True) -> None:
        self.source = source
        self.block_size = block_size
        self.keep_open = keep_open
        self._handle: BinaryIO | None = None
        self._offset = 0
        self.done = False

    def read(self) -> bytes:
        """The next block (b"" at the end); StreamFailure if the file cannot be read."""
        if self.done:
            return b""
        try:
            if self._handle is None:
                self._handle = open(self.source.path, "rb", buffering=0)  # noqa: SIM115
                if self._offset:
                    self._handle.seek(self._offset)
            block = self._handle.read(self.block_size) or b""
        except OSError as exc:
            self.close()
            raise StreamFailure(f"cannot read: {exc.strerror}") from None
        self._offset += len(block)
        if not block:
            self.done = True
            self.close()
        elif not self.keep_open:
            self.close()
        return block

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def refuse_to_overwrite_an_input(path: str, sources: Sequence[object]) -> None:
    """UsageError if the output (-w PATH, or stdout for "-") is one of the input files.

    Opening it for writing would truncate the input before it is read (`-w a.pcap a.pcap`),
    and appending to a file being read (`>> a.pcap`) never ends. Same file: same device and
    inode, whatever the path says.
    """
    try:
        out = os.fstat(1) if path == "-" else os.stat(path)
    except OSError:  # not there yet: it cannot be an input
        return
    if not stat.S_ISREG(out.st_mode):
        return
    for source in sources:
        if not isinstance(source, FileSource):
            continue
        try:
            info = os.fstat(0) if source.path == "-" else os.stat(source.path)
        except OSError:
            continue
        if (info.st_dev, info.st_ino) == (out.st_dev, out.st_ino):
            output = "standard output" if path == "-" else f"-w {path}"
            raise UsageError(
                f"{output} is the input file {source.name}: writing would destroy it before "
                "it is read; write the merge to another file"
            )


class FileStream:
    """Reads a capture file, with the interface of a CaptureStream.

    A regular file is read in large blocks. Standard input and FIFOs are read as they come,
    without blocking the event loop: a quiet writer must not freeze the other targets, the
    timers or the signals.
    """

    def __init__(self, source: FileSource) -> None:
        self.source = source
        self._closing = False
        self._pipe: PipeReader | None = None
        self._fifo_waiting: str | None = None  # a FIFO whose open waits for a writer

    async def run(self, on_opened: OpenedCallback, on_data: DataCallback) -> None:
        path = self.source.path
        try:
            if path == "-":
                fd = os.dup(sys.stdin.fileno())
            elif stat.S_ISFIFO(os.stat(path).st_mode):
                opened = await self._open_fifo(path)
                if opened is None:
                    return
                fd = opened
            else:
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise StreamFailure(f"cannot open: {exc.strerror}") from None
        on_opened(Opened(clock_offset_ns=None))
        if stat.S_ISREG(os.fstat(fd).st_mode):
            with os.fdopen(fd, "rb") as handle:
                await self._read_file(handle, on_data)
        else:
            self._pipe = PipeReader(fd)
            try:
                await self._read_pipe(self._pipe, on_data)
            finally:
                self._pipe.close()

    async def _open_fifo(self, path: str) -> int | None:
        # Opening a FIFO for reading waits for its writer (`mkfifo f; ddump f ...`, then
        # `ssh host tcpdump -w - > f`): in a thread, so the other targets go on; close()
        # opens the FIFO for writing to end that wait. None: closed meanwhile.
        self._fifo_waiting = path
        try:
            fd = await asyncio.get_running_loop().run_in_executor(
                None, os.open, path, os.O_RDONLY | os.O_CLOEXEC
            )
        finally:
            self._fifo_waiting = None
        if self._closing:
            os.close(fd)
            return None
        return fd

    async def _read_file(self, handle: BinaryIO, on_data: DataCallback) -> None:
        async def block() -> bytes:
            return handle.read(READ_SIZE)

        await self._pump(block, on_data)

    async def _read_pipe(self, pipe: PipeReader, on_data: DataCallback) -> None:
        await self._pump(lambda: pipe.read(READ_SIZE), on_data)

    async def _pump(self, read: Callable[[], Awaitable[bytes]], on_data: DataCallback) -> None:
        while not self._closing:
            try:
                block = await read()
            except OSError as exc:
                raise StreamFailure(f"cannot read: {exc.strerror}") from None
            if not block:
                return
            pending = on_data(block)
            if pending is not None:
                await pending
            else:
                await asyncio.sleep(0)  # let the other streams and the output run

    def close(self) -> None:
        self._closing = True
        if self._pipe is not None:
            self._pipe.close()
        if self._fifo_waiting is not None:
            with contextlib.suppress(OSError):  # a writer came meanwhile: the wait is over
                os.close(os.open(self._fifo_waiting, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
