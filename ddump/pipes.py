"""Reading a pipe from the event loop without blocking it."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable


class PipeReader:
    """Non-blocking reads of one pipe: a read that finds data is one system call.

    The worker reads tcpdump's stdout every few packets, so it avoids the event loop (and an
    IOStream's buffer copy) whenever the pipe already holds data; the CLI reads standard input
    and FIFOs with it without blocking the other targets.
    """

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self.fd: int | None = fd
        self._waiter: asyncio.Future[None] | None = None
        self._watcher: Callable[[], None] | None = None

    async def read(self, size: int) -> bytes:
        """Up to `size` bytes; b"" at the end of the pipe or once closed."""
        while (data := self.read_now(size)) is None:
            await self.readable()
        return data

    def read_now(self, size: int) -> bytes | None:
        """Up to `size` bytes if the pipe holds some; None if it is empty for now; b"" at its
        end or once closed."""
        if self.fd is None:
            return b""
        try:
            return os.read(self.fd, size)
        except BlockingIOError:
            return None

    async def readable(self) -> None:
        """Return once the pipe holds data, ended or was closed."""
        if self.fd is not None:
            await self._readable(self.fd)

    def watch(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever the pipe is readable (and once when it is closed), until
        unwatch(): no future and no task switch per wakeup."""
        if self.fd is not None and self._watcher is None:
            self._watcher = callback
            asyncio.get_running_loop().add_reader(self.fd, callback)

    def unwatch(self) -> None:
        if self._watcher is not None:
            self._watcher = None
            if self.fd is not None:
                asyncio.get_running_loop().remove_reader(self.fd)

    async def _readable(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        loop.add_reader(fd, self._wake)
        try:
            await waiter
        finally:
            self._waiter = None
            if self.fd is not None:
                loop.remove_reader(fd)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        loop = asyncio.get_running_loop()
        if self._waiter is not None:
            loop.remove_reader(fd)
            self._wake()
        if self._watcher is not None:
            loop.remove_reader(fd)
            loop.call_soon(self._watcher)  # it reads b"": the end
            self._watcher = None
        os.close(fd)
