"""Check that two merged captures hold the same records in the same order.

    python bench/compare_pcaps.py merged-by-ddump.pcap merged-by-mergecap.pcap

A small reader of its own (not ddump's parser, which is what is being checked). Both files must
be classic pcap with nanosecond timestamps and the same link type. Records must be identical,
byte for byte (header and data), and in the same order wherever timestamps differ; records
with equal timestamps may come in either order (mergecap and ddump break ties their own way),
so each group of equal timestamps is compared as a multiset.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

GLOBAL = struct.Struct("<IHHiIII")
RECORD = struct.Struct("<IIII")
MAGIC_NANO_LE = 0xA1B23C4D


@dataclass(frozen=True)
class Comparison:
    records: int
    tie_groups: int  # groups of records with one timestamp
    tie_groups_reordered: int  # of those, how many came in a different order
    problems: list[str]

    @property
    def same(self) -> bool:
        return not self.problems


def read_header(data: bytes, name: str) -> tuple[int, int]:
    """(snaplen, linktype) of a little-endian nanosecond pcap."""
    if len(data) < GLOBAL.size:
        raise ValueError(f"{name}: shorter than a pcap global header")
    magic, major, _, _, _, snaplen, linktype = GLOBAL.unpack_from(data)
    if magic != MAGIC_NANO_LE or major != 2:
        raise ValueError(f"{name}: not a little-endian nanosecond pcap (magic {magic:#x})")
    return snaplen, linktype


def records(data: bytes, name: str) -> Iterator[tuple[int, bytes]]:
    """(timestamp in ns, whole record) for every record."""
    pos, end = GLOBAL.size, len(data)
    while pos < end:
        if pos + RECORD.size > end:
            raise ValueError(f"{name}: cut inside a record header at byte {pos}")
        sec, nsec, caplen, _ = RECORD.unpack_from(data, pos)
        nxt = pos + RECORD.size + caplen
        if nxt > end:
            raise ValueError(f"{name}: cut inside a record at byte {pos}")
        yield sec * 1_000_000_000 + nsec, data[pos:nxt]
        pos = nxt


def groups(data: bytes, name: str) -> Iterator[tuple[int, list[bytes]]]:
    """Records grouped by equal timestamps, in file order; checks the order never goes back."""
    current, members = -1, []
    for ts, rec in records(data, name):
        if ts == current:
            members.append(rec)
            continue
        if ts < current:
            raise ValueError(f"{name}: timestamp {ts} comes after {current}")
        if members:
            yield current, members
        current, members = ts, [rec]
    if members:
        yield current, members


def compare(a: bytes, b: bytes, names: tuple[str, str] = ("a", "b")) -> Comparison:
    """Compare two merged captures' contents (see the module docstring)."""
    problems: list[str] = []
    (_, link_a), (_, link_b) = read_header(a, names[0]), read_header(b, names[1])
    if link_a != link_b:
        problems.append(f"link types differ: {link_a} vs {link_b}")
    count = ties = reordered = 0
    iter_b = groups(b, names[1])
    for ts, members in groups(a, names[0]):
        other = next(iter_b, None)
        if other is None:
            problems.append(f"{names[1]} ends before timestamp {ts}")
            break
        if other[0] != ts:
            problems.append(f"record {count + 1}: timestamp {ts} vs {other[0]}")
            break
        if members != other[1]:
            if sorted(members) != sorted(other[1]):
                problems.append(f"records at timestamp {ts} differ")
                break
            reordered += 1
        ties += len(members) > 1
        count += len(members)
    else:
        if next(iter_b, None) is not None:
            problems.append(f"{names[1]} has more records than {names[0]} ({count})")
    return Comparison(count, ties, reordered, problems)


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    paths = [Path(p) for p in sys.argv[1:]]
    result = compare(paths[0].read_bytes(), paths[1].read_bytes(), (sys.argv[1], sys.argv[2]))
    print(
        f"{result.records} records, {result.tie_groups} groups of equal timestamps "
        f"({result.tie_groups_reordered} in another order)"
    )
    for problem in result.problems:
        print(f"DIFFERENT: {problem}")
    sys.exit(0 if result.same else 1)


if __name__ == "__main__":
    main()
