"""A child's standard output read straight from the event loop: the pcap of an `ssh://` capture.

Like a worker's socket (ddump/cli/http_conn.py), and unlike asyncio's subprocess pipes: the
pipe's reader callback reads into one shared buffer and hands on a copy of what came, with no
StreamReader holding bytes in between. While the consumer is not ready the pipe is not
watched, so what comes meanwhile waits in the pipe, where the session's probe of unread bytes
sees it (ddump/cli/unread.py), and the consumer's readiness reads it at once.
"""

from __future__ import annotations

import asyncio
import os

from ddump.cli.sources import DataCallback
from ddump.cli.unread import UnreadSlot

READ_SIZE = 256 * 1024
_BUFFER = bytearray(READ_SIZE)  # shared: the loop runs one callback at a time
_VIEW = memoryview(_BUFFER)


class PipeReader:
    """Hands what a non-blocking pipe's read end holds to `deliver`, until its end."""

    def __init__(self, fd: int, unread: UnreadSlot | None = None) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self._loop = asyncio.get_running_loop()
        self._unread = unread
        self._deliver: DataCallback | None = None
        self._done: asyncio.Future[None] = self._loop.create_future()
        self._watching = False

    async def run(self, deliver: DataCallback) -> None:
        """Hand on every read until the pipe's end; what `deliver`, or what it returned,
        raised. The pipe is closed when this returns."""
        self._deliver = deliver
        if self._unread is not None and self.fd >= 0:
            self._unread.watch(self.fd)  # from now on it is read: its bytes may hold the merge
        try:
            self._read()
            await self._done
        finally:
            self.close()

    def close(self) -> None:
        if self._watching:
            self._watching = False
            self._loop.remove_reader(self.fd)
        if self._unread is not None:
            self._unread.forget()  # before the number can be another file's
            self._unread = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self._done.done():
            self._done.set_result(None)

    def _read(self) -> None:
        if self._done.done():
            return
        try:
            count = os.readv(self.fd, [_BUFFER])
        except (BlockingIOError, InterruptedError):
            self._watch()
            return
        except OSError as exc:
            self._done.set_exception(exc)
            return
        if count == 0:
            self._done.set_result(None)
            return
        assert self._deliver is not None
        try:
            pending = self._deliver(bytes(_VIEW[:count]))
        except Exception as exc:
            self._done.set_exception(exc)
            return
        if pending is None:
            self._watch()
            return
        if self._watching:
            self._watching = False
            self._loop.remove_reader(self.fd)
        asyncio.ensure_future(pending).add_done_callback(self._ready)

    def _ready(self, done: asyncio.Future[None]) -> None:
        if self._done.done():
            return
        error = asyncio.CancelledError() if done.cancelled() else done.exception()
        if error is not None:
            self._done.set_exception(error)
            return
        self._read()  # most likely there is more: read it now, not after a loop pass

    def _watch(self) -> None:
        if not self._watching and self.fd >= 0:
            self._watching = True
            self._loop.add_reader(self.fd, self._read)
