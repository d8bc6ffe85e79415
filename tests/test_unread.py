"""The probe of bytes waiting unread in our own sockets and pipes (ddump/cli/unread.py)."""

from __future__ import annotations

import os
import resource
import socket

from ddump.cli.unread import UnreadProbe
from tests.conftest import require


def test_a_descriptor_counts_while_bytes_wait_in_it_and_an_end_counts_until_read() -> None:
    probe = UnreadProbe()
    ours, theirs = socket.socketpair()
    try:
        probe.slot(4).watch(ours.fileno())
        assert probe.streams() == []
        theirs.sendall(b"x")
        assert probe.streams() == [4]
        ours.recv(10)
        assert probe.streams() == []
        theirs.close()  # the end is news too: the stream must read it
        assert probe.streams() == [4]
    finally:
        probe.close()
        ours.close()


def test_bytes_above_the_descriptor_count_until_said_otherwise_or_forgotten() -> None:
    probe = UnreadProbe()
    slot = probe.slot(2)
    slot.buffered(True)  # e.g. decrypted by TLS, not yet handed on
    assert probe.streams() == [2]
    slot.buffered(False)
    assert probe.streams() == []
    slot.buffered(True)
    slot.forget()
    assert probe.streams() == []
    probe.close()


def test_a_forgotten_descriptor_number_used_again_does_not_count_for_the_old_stream() -> None:
    probe = UnreadProbe()
    read_end, write_end = os.pipe()
    slot = probe.slot(1)
    slot.watch(read_end)
    slot.forget()
    os.close(read_end)
    os.close(write_end)
    again, writer = os.pipe()  # most likely the same numbers
    try:
        os.write(writer, b"x")
        assert probe.streams() == []
        probe.slot(6).watch(again)
        assert probe.streams() == [6]
    finally:
        probe.close()
        os.close(again)
        os.close(writer)


def test_more_than_a_thousand_descriptors_with_bytes_all_count() -> None:
    # epoll gives at most FD_SETSIZE - 1 (1,023) events a call unless told otherwise.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * 1_100 + 64
    require(hard >= want, f"needs {want} open files (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    probe = UnreadProbe()
    pipes = [os.pipe() for _ in range(1_100)]
    try:
        for stream, (read_end, write_end) in enumerate(pipes):
            probe.slot(stream).watch(read_end)
            os.write(write_end, b"x")
        assert sorted(probe.streams()) == list(range(1_100))
    finally:
        probe.close()
        for read_end, write_end in pipes:
            os.close(read_end)
            os.close(write_end)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
