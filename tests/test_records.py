"""ddump.records: the C batch engine gives what the pure-Python engine gives, record for record."""

from __future__ import annotations

import itertools
import os
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddump import records
from ddump.pcap import PcapStreamParser
from ddump.records import Record
from tests.conftest import IN_CI

try:
    from ddump import _records
except ImportError:
    _records = None  # type: ignore[assignment]

needs_c = pytest.mark.skipif(
    _records is None and not IN_CI, reason="the C part (ddump/_records.c) is not built here"
)
REC = struct.Struct("<IIII")


def record(ts: int, payload: bytes) -> Record:
    sec, nsec = divmod(ts, 1_000_000_000)
    return ts, REC.pack(sec, nsec, len(payload), len(payload) + 3) + payload


# Timestamps from a small range, so that ties are common; payloads name their place.
timestamps = st.integers(1_700_000_000 * 10**9, 1_700_000_000 * 10**9 + 40)


def streams_of(draw_ts: list[list[int]]) -> list[list[Record]]:
    return [
        [record(ts, b"s%d.%d" % (s, i) * (1 + i % 3)) for i, ts in enumerate(sorted(times))]
        for s, times in enumerate(draw_ts)
    ]


def test_the_c_part_is_built_where_ci_runs() -> None:
    # A failed build falls back silently to the pure-Python engine (3-4.5x slower): CI must
    # notice. Elsewhere the fallback is a supported way to run.
    if not IN_CI:
        pytest.skip("only CI=true requires the C part")
    assert records.ENGINE == "c", "ddump/_records.c was not built: install gcc and python3-dev"


@needs_c
@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(timestamps, max_size=12), min_size=1, max_size=5), st.data())
def test_merge_of_batches_equals_the_python_merge(
    times: list[list[int]], data: st.DataObject
) -> None:
    streams = streams_of(times)
    # Each run cut into batches at random points, some of them empty.
    py_runs: list[list[records.Records]] = []
    c_runs: list[list[_records.Batch]] = []
    for stream in streams:
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=3)))
        bounds = [0, *cuts, len(stream)]
        parts = [stream[a:b] for a, b in itertools.pairwise(bounds)]
        py_runs.append(list(parts))
        c_runs.append([_records.from_records(part) for part in parts])

    expected = list(records.merge(py_runs))  # lists only: the pure-Python path
    merged = _records.merge(c_runs)
    assert list(merged) == expected
    assert merged == expected
    assert merged.data == b"".join(data for _, data in expected)
    assert merged.sorted


@needs_c
@settings(max_examples=200, deadline=None)
@given(st.lists(timestamps, max_size=30), st.integers(0, 64), st.data())
def test_scan_equals_the_python_scan_and_slices_and_bisects_alike(
    times: list[int], junk: int, data: st.DataObject
) -> None:
    recs = [record(ts, b"x" * (i % 7)) for i, ts in enumerate(times)]
    body = b"".join(rec for _, rec in recs)
    cut = data.draw(st.integers(0, len(body)))  # the buffer ends anywhere, mid-record too
    buf = b"P" * junk + body[:cut]
    batch, pos, need, bad = _records.scan(buf, junk, 262144)
    expected = records._scan_python(buf, junk, 262144)
    assert (list(batch), pos, need, bad) == (list(expected[0]), *expected[1:])
    assert batch.sorted == (list(batch) == sorted(batch, key=lambda r: r[0]))
    assert batch.data == b"".join(rec for _, rec in batch)

    start, stop = sorted(data.draw(st.lists(st.integers(-40, 40), min_size=2, max_size=2)))
    assert list(batch[start:stop]) == list(expected[0])[start:stop]
    if batch:
        probe = data.draw(timestamps)
        ordered = _records.from_records(sorted(batch, key=lambda r: r[0]))
        assert ordered.bisect(probe) == sum(ts <= probe for ts, _ in batch)
        assert ordered.bisect(2**63) == len(batch) and ordered.bisect(-(2**70)) == 0
        assert (batch.first_ts, batch.last_ts) == (batch[0][0], batch[-1][0])
        assert batch.timestamps() == [ts for ts, _ in batch]


@needs_c
def test_scan_stops_before_a_record_longer_than_the_limit() -> None:
    good = record(5, b"ok")[1]
    bad = REC.pack(0, 6, 300_000, 300_000) + b"junk"
    batch, pos, need, caplen = _records.scan(good + bad, 0, 262144)
    assert (len(batch), pos, need, caplen) == (1, len(good), 16, 300_000)


@needs_c
def test_concat_keeps_order_and_bytes_and_knows_when_it_is_unsorted() -> None:
    a = _records.from_records([record(5, b"a"), record(7, b"b")])
    b = _records.from_records([record(6, b"c")])
    joined = _records.concat([a, b[:0], b])
    assert [ts for ts, _ in joined] == [5, 7, 6]
    assert not joined.sorted
    assert joined.data == a.data + b.data
    assert records.ordered(joined) == sorted(joined, key=lambda r: r[0])


@needs_c
def test_batches_keep_their_bytes_alive() -> None:
    buf = b"".join(record(ts, b"%06d" % ts * 50)[1] for ts in range(1000))
    batch = _records.scan(bytes(buf), 0, 262144)[0][10:20]
    del buf
    assert [int(data[16:22]) for _, data in batch] == list(range(10, 20))


@needs_c
def test_from_records_refuses_what_is_not_a_pcap_record() -> None:
    with pytest.raises(ValueError, match="caplen"):
        _records.from_records([(1, b"too short")])
    with pytest.raises(TypeError):
        _records.from_records([(1, "text")])


@needs_c
def test_both_engines_merge_files_into_the_same_bytes(tmp_path: Path) -> None:
    # The whole CLI, once with the C part and once without: identical output, ties included.
    files = []
    for s in range(3):
        recs = [
            record(1_700_000_000 * 10**9 + (i * 7 + s) // 3, b"%d/%d" % (s, i)) for i in range(500)
        ]
        path = tmp_path / f"s{s}.pcap"
        path.write_bytes(
            struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 262144, 276)
            + b"".join(rec for _, rec in recs)
        )
        files.append(str(path))
    outputs = []
    for pure in ("", "1"):
        env = {**os.environ, "DDUMP_PURE_PYTHON": pure}
        done = subprocess.run(
            [sys.executable, "-m", "ddump.cli.main", *files, "-w", "-"],
            env=env, capture_output=True, timeout=60, check=True,
        )  # fmt: skip
        outputs.append(done.stdout)
    assert len(outputs[0]) == 24 + 3 * sum(16 + len(b"%d/%d" % (0, i)) for i in range(500))
    assert outputs[0] == outputs[1]


def test_version_says_which_engine_runs() -> None:
    def version(pure: str) -> str:
        env = {**os.environ, "DDUMP_PURE_PYTHON": pure}
        done = subprocess.run(
            [sys.executable, "-m", "ddump.cli.main", "--version"],
            env=env, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        return done.stdout.strip()

    assert version("1").endswith("(merge engine: pure Python)")
    # The child runs with the C part unless told otherwise, whatever this process runs.
    expected = "pure Python" if _records is None else "C"
    assert version("").endswith(f"(merge engine: {expected})")


@needs_c
@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=20), st.booleans(), st.integers(0, 30), st.data())
def test_skip_counts_records_like_the_python_walk(
    sizes: list[int], big: bool, start: int, data: st.DataObject
) -> None:
    layout = struct.Struct(">IIII" if big else "<IIII")
    body = b"".join(layout.pack(1, 2, size, size) + b"y" * size for size in sizes)
    buf = b"z" * start + body[: data.draw(st.integers(0, len(body)))]
    saved = records._c
    try:
        records._c = None  # type: ignore[assignment]
        expected = records.skip(buf, start, big)
    finally:
        records._c = saved
    assert _records.skip(buf, start, big) == expected
    whole = sum(1 for i in range(len(sizes)) if 16 * (i + 1) + sum(sizes[:i]) <= len(buf) - start)
    assert expected[0] == whole


@needs_c
def test_a_batch_of_one_packet_keeps_no_room_for_more() -> None:
    # In immediate mode most chunks hold one packet, and a quiet target can hold thousands of
    # such batches in the merge: each must cost about its record, not arrays sized for 1024.
    one = record(5, b"p" * 60)[1]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [_records.scan(one, 0, 262144)[0] for _ in range(1000)]
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(kept) == 1000 and all(len(batch) == 1 for batch in kept)
    assert grown < 1000 * 400, f"{grown / 1000:.0f} bytes per one-packet batch"


@needs_c
@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.binary(max_size=40)),
        max_size=10,
    ),
    st.booleans(),
    st.sampled_from([1, 1000]),
    st.integers(0, 40),
    st.integers(0, 50),
)
def test_converting_scan_equals_the_python_conversion(
    packets: list[tuple[int, int, bytes]], big_endian: bool, scale: int, limit: int, cut: int
) -> None:
    # Any seconds and fraction (a sloppy writer's microseconds >= 10**6 carry into seconds),
    # a caplen over the limit somewhere, a record cut by the end of the buffer.
    layout = struct.Struct(">IIII" if big_endian else "<IIII")
    buf = b"".join(layout.pack(s, f, len(d), len(d) + 1) + d for s, f, d in packets)
    buf = buf[: max(0, len(buf) - cut)]
    parser = PcapStreamParser()
    parser._rec, parser._scale, parser._limit, parser._keep = layout, scale, limit, limit
    expected, py_pos, py_bad = parser._parse_converting(buf, 0)
    py_need = parser._need

    batch, pos, need, bad = _records.scan_converting(buf, 0, big_endian, scale, limit)

    assert list(batch) == expected
    assert batch.data == b"".join(data for _, data in expected)
    assert (pos, need, bad) == (py_pos, py_need, py_bad)
