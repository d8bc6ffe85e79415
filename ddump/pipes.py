"""Reading a pipe from the event loop without blocking it."""

from __future__ import annotations

import asyncio
import os


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

    async def read(self, size: int) -> bytes:
        """Up to `size` bytes; b"" at the end of the pipe or once closed."""
        while self.fd is not None:
            try:
                return os.read(self.fd, size)
            except BlockingIOError:
                await self._readable(self.fd)
        return b""

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
        if self._waiter is not None:
            asyncio.get_running_loop().remove_reader(fd)
            self._wake()
        os.close(fd)
