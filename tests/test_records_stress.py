"""ddump.records under stress: hostile inputs to the C part, and both engines on random work."""

from __future__ import annotations

import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from hypothesis import given, settings
from hypothesis import strategies as st

from ddump import records
from ddump.errors import PcapFormatError
from ddump.merge import Merger
from ddump.pcap import PcapStreamParser
from ddump.records import Record
from tests.test_records import _records, needs_c, record

BASE = 1_700_000_000 * 10**9


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    # In a child: what this guards against is a crash of the interpreter, not an exception.
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


@contextmanager
def pure_python() -> Iterator[None]:
    saved = records._c
    records._c = None  # type: ignore[assignment]
    try:
        yield
    finally:
        records._c = saved  # type: ignore[assignment]


@needs_c
def test_a_record_stamped_at_the_largest_timestamp_cannot_crash_the_merge() -> None:
    # merge() marks an exhausted run with INT64_MAX; a record stamped so used to tie with it
    # and send the merge reading past the run's batches (SIGSEGV).
    done = run_python(
        "import struct\n"
        "from ddump import _records\n"
        "head = struct.pack('<IIII', 0, 0, 1, 1)\n"
        "a = _records.from_records([(1, head + b'a')])\n"
        "try:\n"
        "    b = _records.from_records([(2**63 - 1, head + b'b')])\n"
        "except OverflowError:\n"
        "    print('refused')\n"
        "else:\n"
        "    print(len(_records.merge([[a], [b]])))\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in ("refused", "2")


@needs_c
def test_from_records_reads_the_records_it_was_given_even_if_a_timestamp_empties_the_list() -> None:
    # A timestamp that is not an int runs its __index__ in the middle of from_records; the
    # list it empties must not be read after its items are freed.
    done = run_python(
        "import struct\n"
        "from ddump import _records\n"
        "recs = []\n"
        "class Ts:\n"
        "    def __init__(self, v): self.v = v\n"
        "    def __index__(self):\n"
        "        recs.clear()\n"
        "        return self.v\n"
        "for i in range(50):\n"
        "    recs.append((Ts(i), struct.pack('<IIII', 0, i, 100, 100) + bytes([i]) * 100))\n"
        "batch = _records.from_records(recs)\n"
        "print([(ts, data[16], len(data)) for ts, data in batch] ==\n"
        "      [(i, i, 116) for i in range(50)])\n"
    )
    assert (done.returncode, done.stdout.strip()) == (0, "True"), done.stderr


operations = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(0, 2), st.lists(st.integers(0, 30), max_size=6)),
        st.tuples(st.just("release"), st.integers(-1, 35)),
        st.tuples(st.just("oldest"), st.integers(1, 10)),
        st.tuples(st.just("drain"), st.just(0)),
    ),
    max_size=40,
)


@needs_c
@settings(max_examples=500, deadline=None)
@given(operations)
def test_the_merger_releases_the_same_records_with_batches_as_with_lists(
    ops: list[tuple[str, int] | tuple[str, int, list[int]]],
) -> None:
    # Unsorted pushes, pushes at or below an earlier watermark, late records, coalescing and
    # forced releases: the C batches give what the pure-Python lists give, and neither holds
    # back a buffered record at or below the watermark asked for.
    fast, pure = Merger(), Merger()
    buffered: list[tuple[int, int, int]] = []  # (ts, stream, serial) of what the model holds
    for merger in (fast, pure):
        for name in "abc":
            merger.add_stream(name)
    serial = 0
    for op in ops:
        if op[0] == "push":
            stream, offsets = op[1], op[2]  # type: ignore[misc]
            recs = []
            for offset in offsets:
                recs.append(record(BASE + offset, b"%d" % serial))
                serial += 1
            batch = _records.scan(b"".join(data for _, data in recs), 0, 262144)[0]
            late = fast.push(stream, batch)
            with pure_python():
                assert list(late) == list(pure.push(stream, list(recs)))
            kept = {data for _, data in recs} - {data for _, data in late}
            buffered += [(ts, stream, int(data[16:])) for ts, data in recs if data in kept]
        elif op[0] == "oldest":
            if fast.buffered >= op[1]:
                mark = fast.oldest_mark(op[1])
                with pure_python():
                    assert pure.oldest_mark(op[1]) == mark
        else:
            mark = 2**63 if op[0] == "drain" else BASE + op[1] if op[1] >= 0 else -1
            out = fast.release(mark)
            with pure_python():
                assert list(out) == list(pure.release(mark))
            taken = sorted(b for b in buffered if b[0] <= mark)
            buffered = [b for b in buffered if b[0] > mark]
            assert [int(data[16:]) for _, data in out] == [s for _, _, s in taken]
        assert fast.buffered == pure.buffered == len(buffered)
        assert fast.written_ns == pure.written_ns


def _pcap(recs: list[tuple[int, int, int, bytes]], nano: bool, big_endian: bool) -> bytes:
    order = ">" if big_endian else "<"
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 65535, 276)
    for sec, frac, caplen, data in recs:
        out += struct.pack(order + "IIII", sec, frac, caplen, len(data)) + data
    return out


def _parse_in_chunks(body: bytes, cuts: list[int]) -> tuple[list[list[Record]], object]:
    parser = PcapStreamParser()
    out = []
    prev = 0
    try:
        for cut in [*cuts, len(body)]:
            out.append(list(parser.feed(body[prev:cut])))
            prev = cut
        parser.close()
    except PcapFormatError as exc:
        assert type(exc.records) is list
        return out, (str(exc), exc.records)
    return out, None


@needs_c
@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 2**32 - 1),
            st.integers(0, 2**32 - 1),
            st.sampled_from([None, 300_000, 2**32 - 1]),
            st.binary(max_size=20),
        ),
        max_size=6,
    ),
    st.booleans(),
    st.booleans(),
    st.data(),
)
def test_the_parser_gives_the_same_records_and_errors_in_both_engines(
    recs: list[tuple[int, int, int | None, bytes]],
    nano: bool,
    big_endian: bool,
    data: st.DataObject,
) -> None:
    # Any chunking, a caplen over the limit anywhere (its header split across feeds too), and
    # extreme timestamps: the good records before a bad one come as a list, in both engines.
    body = _pcap([(s, f, len(d) if c is None else c, d) for s, f, c, d in recs], nano, big_endian)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=5)))
    fast = _parse_in_chunks(body, cuts)
    with pure_python():
        assert _parse_in_chunks(body, cuts) == fast
