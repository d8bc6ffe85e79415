"""A child's stdout read from the event loop (ddump/cli/pipe_reader.py): what `ssh://` reads."""

from __future__ import annotations

import asyncio
import os

import pytest

from ddump.cli.pipe_reader import READ_SIZE, PipeReader
from ddump.cli.unread import UnreadProbe


def test_everything_written_comes_in_order_to_a_slow_consumer_and_waits_unread_meanwhile() -> None:
    async def main() -> tuple[list[bytes], list[list[int]], int]:
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        probe = UnreadProbe()
        reader = PipeReader(read_end, probe.slot(3))
        loop = asyncio.get_running_loop()
        got: list[bytes] = []
        seen_while_busy: list[list[int]] = []

        def deliver(chunk: bytes) -> asyncio.Future[None]:
            got.append(chunk)
            ready = loop.create_future()

            def done() -> None:
                seen_while_busy.append(probe.streams())
                ready.set_result(None)

            loop.call_later(0.02, done)
            return ready

        async def write() -> None:
            for i in range(20):
                os.write(write_end, bytes([65 + i]) * 100)
                await asyncio.sleep(0.005)
            os.close(write_end)

        writing = asyncio.ensure_future(write())
        await reader.run(deliver)
        await writing
        left = len(probe.streams())
        probe.close()
        return got, seen_while_busy, left

    got, seen_while_busy, left = asyncio.run(main())
    assert b"".join(got) == b"".join(bytes([65 + i]) * 100 for i in range(20))
    assert len(got) < 20  # what came while the consumer was busy was read in one go
    assert [3] in seen_while_busy  # ... and counted as unread until then
    assert left == 0  # the pipe was forgotten at its end


def test_a_read_is_at_most_the_buffer_and_the_pipe_is_closed_at_the_end() -> None:
    async def main() -> tuple[list[int], int]:
        read_end, write_end = os.pipe()
        reader = PipeReader(read_end)
        sizes: list[int] = []

        def deliver(chunk: bytes) -> None:
            sizes.append(len(chunk))

        async def write() -> None:
            data = memoryview(bytes(3 * READ_SIZE))
            while data:
                try:
                    data = data[os.write(write_end, data) :]
                except BlockingIOError:
                    await asyncio.sleep(0.001)
            os.close(write_end)

        os.set_blocking(write_end, False)
        writing = asyncio.ensure_future(write())
        await reader.run(deliver)
        await writing
        return sizes, reader.fd

    sizes, fd = asyncio.run(main())
    assert sum(sizes) == 3 * READ_SIZE
    assert max(sizes) <= READ_SIZE
    assert fd == -1


def test_what_the_consumer_raises_ends_the_read() -> None:
    async def main() -> None:
        read_end, write_end = os.pipe()
        os.write(write_end, b"x")
        reader = PipeReader(read_end)

        def deliver(chunk: bytes) -> None:
            raise ValueError("not a pcap")

        try:
            await reader.run(deliver)
        finally:
            os.close(write_end)

    with pytest.raises(ValueError, match="not a pcap"):
        asyncio.run(main())


def test_a_pipe_counts_as_unread_only_once_it_is_being_read() -> None:
    # ssh writes tcpdump's pcap header before its "listening" line is seen: until the capture
    # reads its pipe, those bytes must not hold the merge (nobody would read them yet).
    async def main() -> tuple[list[int], list[int]]:
        probe = UnreadProbe()
        read_end, write_end = os.pipe()
        reader = PipeReader(read_end, probe.slot(5))
        os.write(write_end, b"header")
        before = probe.streams()
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        running = asyncio.ensure_future(reader.run(lambda chunk: ready))
        await asyncio.sleep(0.01)
        os.write(write_end, b"more")  # the consumer is busy: it waits, and counts
        during = probe.streams()
        ready.set_result(None)
        os.close(write_end)
        await running
        probe.close()
        return before, during

    assert asyncio.run(main()) == ([], [5])


def test_a_consumer_future_cancelled_ends_the_read_instead_of_hanging() -> None:
    async def main() -> None:
        read_end, write_end = os.pipe()
        os.write(write_end, b"x")
        reader = PipeReader(read_end)
        waiting: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.01, waiting.cancel)
        try:
            await asyncio.wait_for(reader.run(lambda chunk: waiting), 5)
        finally:
            os.close(write_end)

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(main())
