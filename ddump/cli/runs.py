"""What one target is during a session, and what the session's parts share.

The session (ddump/cli/session.py) is built from parts, one per responsibility: records in
(ddump/cli/intake.py), capture files pulled by the merge (ddump/cli/pulled.py), tcpdump's counts
at the end (ddump/cli/drops.py). `SessionParts` declares what they use of each other.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from ddump.cli.files import FileSource, FileStream
from ddump.cli.output import Output
from ddump.cli.pacer import Pacer
from ddump.cli.report import Reporter, TargetCounts
from ddump.cli.sources import Opened
from ddump.decode import CaptureDecoder, PcapDecoder
from ddump.errors import DdumpError
from ddump.merge import Merger
from ddump.pcapng import CaptureCounts
from ddump.protocol import BATCH_DELAY_NS, BATCH_PARAM, flag_value
from ddump.records import Records
from ddump.ssh_targets import SshTarget
from ddump.targets import Target

if TYPE_CHECKING:
    from ddump.cli.ssh import SshStream
    from ddump.cli.stream import CaptureStream


TICK_S = 0.02
# Records held for ordering, at least (about 300 MB of 1500-byte packets), and per target: a
# burst of 1,024 targets x 500 records must not pass a fixed cap and turn into late records.
MAX_BUFFERED = 200_000
HOLD_PER_TARGET = 1_000
LIVE = (Target, SshTarget)  # captures, with a clock: a worker's, or tcpdump's over SSH


@dataclass(frozen=True)
class SessionSettings:
    max_delay_ns: int
    connect_timeout_s: float
    count: int | None = None
    duration_ns: int | None = None
    reconnect: bool = False


@dataclass
class Run:
    """One target during the session."""

    index: int
    target: Target | SshTarget | FileSource
    counts: TargetCounts
    decoder: CaptureDecoder | PcapDecoder = field(default_factory=PcapDecoder)
    stream: CaptureStream | SshStream | FileStream | None = None
    linktype: int | None = None
    clock_offset_ns: int = 0  # worker clock minus ours: at least this...
    clock_offset_high_ns: int = 0  # ...and at most this (a round trip above the headers' low)
    opened_at: float | None = None  # loop time of the 200, while its pcap header is awaited
    # (also in SessionParts._awaiting_header meanwhile, so the ticker need not walk every run)
    opened: Opened | None = None
    staged: list[tuple[int, Records]] = field(default_factory=list)  # (link type, records)
    failed: bool = False
    refused: str = ""  # why its records cannot join the output, once known
    clock_known: bool = True  # False: no clock header; the first packet tells its offset
    last_ts: int = -1  # a file's newest timestamp so far, in file order
    capture_ids: list[str] = field(default_factory=list)  # one per connection (--reconnect)
    tcpdump: CaptureCounts | None = None  # tcpdump's counts, summed over its captures
    answered: bool = False  # some capture of it ran (a 200 came)
    capturing_since: float = 0.0  # loop time of the current capture's 200
    stalled_captures: set[str] = field(default_factory=set)  # capture ids whose connection stalled
    last_read: float = 0.0  # monotonic time its last chunk came (see pacer.py)
    final_stats: dict[str, dict[str, object]] = field(default_factory=dict)  # by capture id


class SessionParts:
    """The state every part of a session reads, and the steps one part asks of another."""

    runs: list[Run]
    merger: Merger
    output: Output
    reporter: Reporter
    settings: SessionSettings
    stopping: bool
    staged: int  # records held until the output's link type is known
    hold_cap: int  # records held for ordering at most (see MAX_BUFFERED)
    _awaiting_header: set[int]  # runs that answered and have not sent their header yet
    fatal: DdumpError | None
    _cutoff_ns: int | None  # the time of a stop that waits for batch targets
    _warned_full: bool
    pacer: Pacer  # busy live streams read in common turns
    _release_due: bool  # a release is scheduled for this pass of the event loop
    _started_ns: int  # when the session started (a target failing at first misses from then)

    def stop(self, reason: str) -> None:
        raise NotImplementedError

    def _failed(self, run: Run, message: str, silent_ns: int = 0) -> None:
        raise NotImplementedError

    def _on_opened(self, run: Run, opened: Opened) -> None:
        raise NotImplementedError

    def _learn_clock(self, run: Run, newest_ns: int) -> None:
        raise NotImplementedError

    def _tls_context(self, target: Target) -> ssl.SSLContext | None:
        raise NotImplementedError

    def _on_data(self, run: Run, chunk: bytes) -> Awaitable[None] | None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def _tick_by(self, wait_s: float) -> None:
        raise NotImplementedError

    def _take_output_error(self) -> None:
        raise NotImplementedError

    def _stop_waiting_for_silent_streams(self) -> None:
        raise NotImplementedError

    def _release_wait_s(
        self, now_ns: int | None = None, watermark: int | None = None
    ) -> float | None:
        raise NotImplementedError

    def _end_of_body(self, run: Run) -> None:
        raise NotImplementedError

    def _check_file_order(self, run: Run, records: Records) -> None:
        raise NotImplementedError


def delivery_delay_ns(target: Target | SshTarget | FileSource) -> int:
    """How much later than an immediate capture the target's packets may arrive."""
    if isinstance(target, SshTarget):
        return BATCH_DELAY_NS if target.batch else 0
    if not isinstance(target, Target):
        return 0
    query = parse_qs(urlsplit(target.url).query, keep_blank_values=True)
    return BATCH_DELAY_NS if flag_value(query.get(BATCH_PARAM, ["0"])[-1]) else 0


def decoder_for(target: Target | SshTarget | FileSource) -> CaptureDecoder | PcapDecoder:
    """Files hold any format ddump reads; a live capture stream is pcap."""
    return CaptureDecoder() if isinstance(target, FileSource) else PcapDecoder()


def is_pulled(target: Target | SshTarget | FileSource) -> bool:
    return isinstance(target, FileSource) and target.pulled
