"""Records in batches: what the parser hands the merge, and the merge the writer.

A batch of records is a sequence of (timestamp, bytes) records. Where the C part is built
(ddump/_records.c) a batch of pcap records is a `Batch`: per record only a pointer into the
bytes it was read from and its timestamp, no Python object, and parsing, merging and joining
happen in C, a batch at a time. Otherwise, or for records that are not pcap records (pcapng
blocks), a batch is a list of tuples and the same work is done with list operations. Every
function here takes either kind; results are the same, record for record.

DDUMP_PURE_PYTHON=1 (any non-empty value) in the environment turns the C part off (to compare,
or to test).
"""

from __future__ import annotations

import os
import struct
from bisect import bisect_right
from collections.abc import Sequence
from itertools import chain
from operator import itemgetter
from typing import Final, cast

Record = tuple[int, bytes]
"""(timestamp in ns since the epoch, LE-nano record header + packet data)."""

Records = Sequence[Record]
"""A batch of records: a list of tuples, or a C Batch."""

RECORD_HEADER_LEN: Final = 16
_TS: Final = itemgetter(0)
_REC_TS_CAPLEN: Final = struct.Struct("<III")
_CAPLEN_LE: Final = struct.Struct("<I")
_CAPLEN_BE: Final = struct.Struct(">I")

try:
    from ddump import _records as _c
except ImportError:  # built without a C compiler or the Python headers
    _c = None  # type: ignore[assignment]
if os.environ.get("DDUMP_PURE_PYTHON"):
    _c = None  # type: ignore[assignment]

ENGINE: Final = "python" if _c is None else "c"


def scan(buf: bytes, pos: int, limit: int) -> tuple[Records, int, int, int]:
    """The whole little-endian nanosecond records of `buf` from `pos` on.

    Returns (records, pos, need, bad): where parsing stopped, how many bytes the record there
    needs (16 while its header is not all in), and its caplen if that exceeds `limit`
    (0 if not); parsing stops before such a record.
    """
    if _c is not None:
        return _c.scan(buf, pos, limit)
    return _scan_python(buf, pos, limit)


def _scan_python(buf: bytes, pos: int, limit: int) -> tuple[Records, int, int, int]:
    # The hot loop of the pure-Python engine: every bytecode here runs once per packet.
    # Caching sec * 10**9 while the second does not change is worth ~9 %; finding a record cut
    # by the end of the buffer once, after the loop, saves a test per packet.
    out: list[Record] = []
    append = out.append
    unpack = _REC_TS_CAPLEN.unpack_from
    end = len(buf)
    last = end - RECORD_HEADER_LEN
    last_sec = -1
    base = caplen = 0
    while pos <= last:
        sec, nsec, caplen = unpack(buf, pos)
        if caplen > limit:
            return out, pos, RECORD_HEADER_LEN, caplen
        if sec != last_sec:
            last_sec = sec
            base = sec * 1_000_000_000
        nxt = pos + RECORD_HEADER_LEN + caplen
        append((base + nsec, buf[pos:nxt]))
        pos = nxt
    if pos > end:  # the last record is cut short: it waits for more bytes
        out.pop()
        size = RECORD_HEADER_LEN + caplen
        return out, pos - size, size, 0
    return out, pos, RECORD_HEADER_LEN, 0


def skip(buf: bytes, pos: int, big_endian: bool) -> tuple[int, int]:
    """Step over the records of `buf` from `pos`, reading only each caplen: (count, pos).

    Every record whose header is in `buf` counts; the returned pos may lie past the end of
    `buf`, inside the last record's body.
    """
    if _c is not None:
        return _c.skip(buf, pos, big_endian)
    unpack = (_CAPLEN_BE if big_endian else _CAPLEN_LE).unpack_from
    last = len(buf) - RECORD_HEADER_LEN
    count = 0
    while pos <= last:
        pos += RECORD_HEADER_LEN + unpack(buf, pos + 8)[0]
        count += 1
    return count, pos


def scan_converting(
    buf: bytes, pos: int, big_endian: bool, scale: int, limit: int
) -> tuple[Records, int, int, int] | None:
    """What `scan` does, for big-endian or microsecond (`scale` 1000) records, rewritten.

    None where the C part is not built: the caller converts them itself (ddump/pcap.py).
    """
    if _c is None:
        return None
    return _c.scan_converting(buf, pos, big_endian, scale, limit)


def scan_epbs(
    buf: bytes, pos: int, big_endian: bool, interfaces: list[tuple[int, int, int] | None]
) -> tuple[Records, list[int], int] | None:
    """pcapng packets from `pos`, as records: (batch, [ifid, count, ...], pos); see _records.c.

    None where the C part is not built: the caller parses them itself (ddump/pcapng_read.py).
    """
    if _c is None:
        return None
    return _c.scan_epbs(buf, pos, big_endian, interfaces)


def pack(records: list[Record]) -> Records:
    """The fastest form of a list of pcap records (not pcapng blocks): a Batch where built."""
    if _c is None or not records:
        return records
    return _c.from_records(records)


def concat(parts: list[Records]) -> Records:
    """One batch of the records of `parts`, in order."""
    parts = [part for part in parts if part]
    if len(parts) == 1:
        return parts[0]
    if _c is not None and all(type(part) is _c.Batch for part in parts):
        return _c.concat(cast("list[_c.Batch]", parts))
    return list(chain.from_iterable(parts))


def ordered(records: Records) -> Records:
    """The records sorted by timestamp (stable: equal timestamps keep their order)."""
    if _c is not None and type(records) is _c.Batch:
        if records.sorted:
            return records
        return _c.from_records(sorted(records, key=_TS))
    if isinstance(records, list):
        records.sort(key=_TS)  # Timsort: one linear pass over an already-sorted list
        return records
    return sorted(records, key=_TS)


def first_ts(records: Records) -> int:
    """The first record's timestamp (the batch is not empty)."""
    if _c is not None and type(records) is _c.Batch:
        return records.first_ts
    return records[0][0]


def last_ts(records: Records) -> int:
    """The last record's timestamp (the batch is not empty)."""
    if _c is not None and type(records) is _c.Batch:
        return records.last_ts
    return records[-1][0]


def count_upto(records: Records, ts: int) -> int:
    """How many records of the sorted batch have a timestamp at or below `ts`."""
    if _c is not None and type(records) is _c.Batch:
        return records.bisect(ts)
    return bisect_right(records, ts, key=_TS)


def timestamps(records: Records) -> list[int]:
    """The records' timestamps."""
    if _c is not None and type(records) is _c.Batch:
        return records.timestamps()
    return [ts for ts, _ in records]


def merge(runs: list[list[Records]]) -> Records:
    """All records of `runs` in timestamp order; each run is a sorted list of sorted batches.

    Equal timestamps come in run order, then in their order within the run.
    """
    runs = [run for run in runs if run]
    if not runs:
        return []
    if len(runs) == 1 and len(runs[0]) == 1:
        return runs[0][0]
    if _c is not None and all(type(b) is _c.Batch for run in runs for b in run):
        return _c.merge(cast("list[list[_c.Batch]]", runs))
    out = list(chain.from_iterable(chain.from_iterable(runs)))
    if len(runs) > 1:
        out.sort(key=_TS)  # stable: ties keep run order; Timsort merges the sorted runs
    return out


def join(records: Records) -> bytes:
    """The records' bytes, back to back."""
    if _c is not None and type(records) is _c.Batch:
        return records.data
    return b"".join([data for _, data in records])
