"""Reading what tcpdump says: its stderr and the records it writes (pure: no I/O)."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from ddump import records as batches

LISTENING_MARK = "listening on"

_STATS_LINE = re.compile(
    r"^\s*(\d+) packets? (captured|received by filter|dropped by kernel|dropped by interface)\s*$"
)

# tcpdump starts its own lines with its program name: "tcpdump: ", or whatever it is called.
_PROGRAM_PREFIX = re.compile(r"^[^\s:]+: ")

# How tcpdump says it may not open the capture device; the fix is a capability, not the request.
_PERMISSION_HINTS = ("permission", "operation not permitted", "not permitted")
# Failures of the machine, not of the request: retrying later or elsewhere may work.
_RESOURCE_HINTS = (
    "cannot allocate memory",
    "too many open files",
    "no buffer space",
    "address family not supported",  # a sandbox without AF_PACKET
    "no such device",
)

CAPABILITY_FIX = (
    "tcpdump needs CAP_NET_RAW. Give it to ddump-worker, which tcpdump inherits: "
    "systemd `AmbientCapabilities=CAP_NET_RAW` (see packaging/), or by hand "
    "`setpriv --inh-caps=+net_raw --ambient-caps=+net_raw ddump-worker ...`; "
    "or grant it to the binary: `setcap cap_net_raw+ep $(command -v tcpdump)`"
)


@dataclass(frozen=True)
class TcpdumpStats:
    """The counts tcpdump prints (at exit, or on SIGUSR1); None when it did not print them."""

    captured: int | None = None
    received: int | None = None
    dropped_by_kernel: int | None = None
    dropped_by_interface: int | None = None

    @classmethod
    def from_counts(cls, counts: dict[str, int]) -> TcpdumpStats:
        """From what `stats_counts` found."""
        return cls(
            captured=counts.get("captured"),
            received=counts.get("received by filter"),
            dropped_by_kernel=counts.get("dropped by kernel"),
            dropped_by_interface=counts.get("dropped by interface"),
        )

    def since(self, earlier: TcpdumpStats) -> TcpdumpStats:
        """The counts from `earlier` on (unknown where either is unknown)."""

        def delta(now: int | None, then: int | None) -> int | None:
            return None if now is None or then is None else max(0, now - then)

        return TcpdumpStats(
            captured=delta(self.captured, earlier.captured),
            received=delta(self.received, earlier.received),
            dropped_by_kernel=delta(self.dropped_by_kernel, earlier.dropped_by_kernel),
            dropped_by_interface=delta(self.dropped_by_interface, earlier.dropped_by_interface),
        )


@dataclass(frozen=True)
class StartFailure:
    """Why a capture could not start: the HTTP status to answer and a message for the user."""

    status: int
    message: str


def stats_counts(line: str) -> dict[str, int]:
    """The counts in one line of tcpdump's stderr ({} if it is not a statistics line).

    At exit tcpdump prints one count a line (`12 packets captured`); on SIGUSR1 all of them on
    one (`tcpdump: 12 packets captured, 30 packets received by filter, 0 packets dropped by
    kernel`).
    """
    counts: dict[str, int] = {}
    for part in _PROGRAM_PREFIX.sub("", line.strip(), count=1).split(","):
        match = _STATS_LINE.match(part)
        if match is None:
            return {}
        counts[match.group(2)] = int(match.group(1))
    return counts


def parse_stats(stderr_text: str) -> TcpdumpStats:
    """The latest statistics in tcpdump's stderr."""
    counts: dict[str, int] = {}
    for line in stderr_text.splitlines():
        counts.update(stats_counts(line))
    return TcpdumpStats.from_counts(counts)


def error_lines(stderr_text: str) -> str:
    """tcpdump's stderr without its informational lines, `tcpdump: ` prefixes removed."""
    kept = []
    for line in stderr_text.splitlines():
        text = line.strip()
        if not text or stats_counts(text):
            continue
        text = text.removeprefix("tcpdump: ")
        if text.startswith(("data link type ", LISTENING_MARK)):
            continue
        kept.append(text)
    return "\n".join(kept)


def classify_start_failure(stderr_text: str, returncode: int | None) -> StartFailure:
    """Map tcpdump exiting before it listened to a status: 503 for the host, else 400.

    The interface is always `any` and every other option was checked already, so what is left
    for tcpdump to refuse is the filter: its compile errors have no common wording
    (`syntax error`, `unknown host 'x'`, `port 99999 out of range`, ...), hence 400 by default.
    """
    message = error_lines(stderr_text)
    if not message:
        message = f"tcpdump exited with status {returncode} before listening"
    lowered = message.lower()
    if any(hint in lowered for hint in _PERMISSION_HINTS):
        return StartFailure(503, f"tcpdump cannot open the capture: {message}\n{CAPABILITY_FIX}")
    if any(hint in lowered for hint in _RESOURCE_HINTS):
        return StartFailure(503, f"tcpdump cannot start on this host now: {message}")
    return StartFailure(400, f"tcpdump rejected the filter: {message}")


_RECORD_LE = struct.Struct("<III")  # seconds, fraction, caplen
_RECORD_BE = struct.Struct(">III")


class RecordCounter:
    """Counts pcap records in a stream fed in arbitrary chunks, by skipping over their bodies.

    Only each record's caplen is read: the worker needs a count for its log, not the packets.
    No copy (but of a header cut by the end of a read) and, with the C part, no Python code per
    record (ddump/records.py, `skip`): this runs for every packet the worker relays. Once
    `cutoff_ns` is set, the stream is cut before the first record captured after it (see
    Capture.stop), and `cut` tells it happened.
    """

    def __init__(self) -> None:
        self.records = 0
        self.bytes = 0
        self.cutoff_ns: int | None = None
        self.cut = False
        self._big: bool | None = None  # the stream's byte order, once the global header is in
        self._header: struct.Struct = _RECORD_LE
        self._scale = 1  # to nanoseconds
        self._next = 0  # stream offset of the next header (global, then each record's)
        self._carry = b""  # that header's first bytes, when a read ended inside it
        self._carry_passed = 0  # how many of them were passed on (all, but past a cutoff)

    def feed(self, data: bytes) -> bytes:
        """Account for the next bytes of the stream; return those to pass on.

        Without a cutoff that is `data` itself. With one, a record header cut by the end of
        `data` is held back until it can be judged, and nothing is passed on after a cut.
        """
        if self.cut:
            return b""
        chunk = data
        first = self.bytes  # stream offset of data[0]
        self.bytes += len(data)
        # The carried bytes went out already, unless a cutoff held them back: then they go
        # out with this read, if their record is kept.
        begin = self._carry_passed
        if self._carry:
            data = self._carry + data
            first = self._next
            self._carry = b""
            self._carry_passed = 0
        pos = self._next - first
        if self._big is None:
            if len(data) - pos < 24:
                self._carry = data[pos:]
                self._carry_passed = len(self._carry)
                return chunk
            # tcpdump writes in its host's byte order: a big-endian host's magic reads a1 b2 ...
            self._big = big = data[pos : pos + 2] == b"\xa1\xb2"
            self._header = _RECORD_BE if big else _RECORD_LE
            nano = data[pos : pos + 4] in (b"\xa1\xb2\x3c\x4d", b"\x4d\x3c\xb2\xa1")
            self._scale = 1 if nano else 1000
            pos += 24
        if self.cutoff_ns is not None:
            return self._feed_until_cutoff(data, pos, first, begin)
        records, pos = batches.skip(data, pos, self._big)
        self.records += records
        self._next = first + pos
        if pos < len(data):
            self._carry = data[pos:]
            self._carry_passed = len(self._carry)
        return chunk

    def between_records(self) -> bool:
        """What was passed on so far ends with a whole record (or the global header)."""
        if self._next == self.bytes:
            return True
        return self._next < self.bytes and self._carry_passed == 0  # a cut header held back

    def next_record(self) -> tuple[int, bytes]:
        """The stream offset of the next record's header, and those of its bytes already fed."""
        return self._next, self._carry

    def _feed_until_cutoff(self, data: bytes, pos: int, first: int, begin: int) -> bytes:
        # Only while a stopping batch capture hands over its last blocks: timestamps too.
        # data[:begin] went out already: a record begun there cannot be cut any more.
        assert self.cutoff_ns is not None
        unpack = self._header.unpack_from
        last = len(data) - 16
        while pos <= last:
            sec, frac, caplen = unpack(data, pos)
            if pos >= begin and sec * 1_000_000_000 + frac * self._scale > self.cutoff_ns:
                self.cut = True
                return data[begin:pos]
            pos += 16 + caplen
            self.records += 1
        self._next = first + pos
        if pos < len(data):  # a header cut short: judged with the next read
            self._carry = data[pos:]
            self._carry_passed = max(0, begin - pos)
            return data[begin:pos]
        return data[begin:]
