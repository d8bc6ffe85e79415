"""PipeReader: non-blocking pipe reads (tcpdump's stdout; the CLI's stdin and FIFOs)."""

from __future__ import annotations

import asyncio
import os

from ddump.pipes import PipeReader


def test_reads_what_is_there_then_waits_for_more_then_sees_the_end() -> None:
    async def scenario() -> list[bytes]:
        read_fd, write_fd = os.pipe()
        reader = PipeReader(read_fd)
        os.write(write_fd, b"first")
        got = [await reader.read(100)]
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, os.write, write_fd, b"second")
        got.append(await reader.read(100))
        loop.call_later(0.05, os.close, write_fd)
        got.append(await reader.read(100))
        reader.close()
        return got

    assert asyncio.run(scenario()) == [b"first", b"second", b""]


def test_close_wakes_a_waiting_read_and_releases_the_pipe() -> None:
    async def scenario() -> tuple[bytes, bool]:
        read_fd, write_fd = os.pipe()
        reader = PipeReader(read_fd)
        waiting = asyncio.ensure_future(reader.read(100))
        await asyncio.sleep(0.02)
        assert not waiting.done()
        reader.close()
        data = await asyncio.wait_for(waiting, 1)
        # The read end is closed: a writer (tcpdump) now fails instead of blocking forever.
        try:
            os.write(write_fd, b"x")
            broken = False
        except BrokenPipeError:
            broken = True
        finally:
            os.close(write_fd)
        assert await reader.read(100) == b""
        return data, broken

    assert asyncio.run(scenario()) == (b"", True)
