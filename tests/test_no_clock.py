"""Targets that send no clock (another server, the earlier Go ddump's workers) merge in order."""

from __future__ import annotations

import time
from pathlib import Path

from ddump.pcap import LINKTYPE_LINUX_SLL
from tests.fake_worker import Script, fake_workers, pcap_stream, sll2_packet
from tests.test_cli import ddump

SLL_FRAME = b"\x00\x00\x00\x01\x00\x06" + b"\x02" * 8 + b"\x08\x00"


def replay(
    name: bytes, base: int, shift: int, parts: int, *, sll: bool = False, big: bool = False
) -> list[bytes | float]:
    """`parts` parts of 100 ms of a trace from minutes ago, each sent 100 ms after the one
    before, as a replay at capture speed; a packet every 5 ms, `shift` µs into its slot."""
    linktype = LINKTYPE_LINUX_SLL if sll else 276
    header = pcap_stream([], linktype=linktype, nano=not big, big_endian=big)
    body: list[bytes | float] = [header]
    for part in range(parts):
        packets = []
        for i in range(20):
            ts = base + part * 100_000_000 + i * 5_000_000 + shift * 1000
            frame = SLL_FRAME + name if sll else sll2_packet(name)
            packets.append((ts, frame))
        stream = pcap_stream(packets, linktype=linktype, nano=not big, big_endian=big)
        body += [stream[24:], 0.1]
    return body


def test_targets_without_a_clock_merge_by_their_own_timestamps(tmp_path: Path) -> None:
    # Minutes behind our clock: merged as if their clocks were ours, every packet would be
    # released at once, in arrival order. Bounded by their packets, they merge in order.
    base = (time.time_ns() - 600 * 10**9) // 1000 * 1000
    scripts = [
        Script(body=replay(b"le-nano", base, 0, 20), clock=False),
        Script(body=replay(b"be-micro", base, 1, 20, sll=True, big=True), clock=False),
        Script(body=replay(b"quiet", base, 2, 5), end="hang", clock=False),
    ]
    with fake_workers(*({"/capture": s} for s in scripts)) as workers:
        result = ddump(
            "--duration", "3.5", *(w.url() for w in workers), tmp_path=tmp_path, timeout=30
        )

    stamps = [ts for ts, _ in result.records()]
    assert result.status == 0, result.stderr
    assert len(stamps) == 20 * 20 * 2 + 5 * 20
    assert stamps == sorted(stamps)
    assert "late" not in result.stderr
    assert result.stderr.count("no clock") >= 3  # said when each starts, and in the summary
