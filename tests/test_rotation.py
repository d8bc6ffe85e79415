"""Rotation as tcpdump does it: names, the -C cut, the ring, -G intervals, -W, bad combinations."""

from __future__ import annotations

import gzip
import time
import zlib

import pytest

from ddump.cli import compress
from ddump.cli.compress import GzipStream, ZstdStream, compression_of, without_compression
from ddump.cli.options import parse_args
from ddump.cli.rotation import (
    Plan,
    Rotation,
    check,
    file_name,
    has_time_fields,
    number_width,
    parse_size,
    records_that_fit,
)
from ddump.errors import UsageError

SECOND = 10**9


def local_ns(text: str) -> int:
    return int(time.mktime(time.strptime(text, "%Y-%m-%d %H:%M:%S"))) * SECOND


@pytest.mark.parametrize(("files", "width"), [(None, 0), (1, 0), (2, 1), (10, 1), (11, 2), (20, 2)])
def test_ring_numbers_have_the_digits_of_n_minus_one_as_tcpdump(
    files: int | None, width: int
) -> None:
    assert number_width(files) == width


def test_size_rotation_without_w_numbers_from_the_second_file_as_tcpdump() -> None:
    plan = Plan(Rotation("x.pcap", size=1_000_000))

    names = [plan.first(0), plan.next_by_size(), plan.next_by_size(), plan.next_by_size()]

    assert names == ["x.pcap", "x.pcap1", "x.pcap2", "x.pcap3"]


def test_a_ring_reuses_its_n_names_oldest_first_and_only_those() -> None:
    plan = Plan(Rotation("ring.pcapng", size=1_000_000, files=3))

    names = [plan.first(0)] + [plan.next_by_size() for _ in range(6)]

    assert names == ["ring.pcapng0", "ring.pcapng1", "ring.pcapng2"] * 2 + ["ring.pcapng0"]


def test_a_ring_of_twenty_is_zero_padded_so_names_sort() -> None:
    plan = Plan(Rotation("f.pcap", size=1, files=20))

    names = [plan.first(0)] + [plan.next_by_size() for _ in range(19)]

    assert names[:2] == ["f.pcap00", "f.pcap01"] and names[-1] == "f.pcap19"
    assert names == sorted(names)


def test_time_rotation_names_each_file_by_when_it_starts() -> None:
    plan = Plan(Rotation("fleet-%Y%m%d-%H%M%S.pcap", seconds_ns=600 * SECOND))
    start = local_ns("2026-03-01 12:00:00")

    first = plan.first(start)
    due = plan.due_ns()
    second = plan.next_by_time(start + 600 * SECOND)

    assert first == "fleet-20260301-120000.pcap"
    assert due == start + 600 * SECOND
    assert second == "fleet-20260301-121000.pcap"
    assert plan.due_ns() == start + 1200 * SECOND


def test_size_within_a_time_interval_numbers_again_from_the_interval_name() -> None:
    plan = Plan(Rotation("t-%H%M.pcap", size=1, seconds_ns=60 * SECOND))
    start = local_ns("2026-03-01 08:30:00")

    names = [plan.first(start), plan.next_by_size(), plan.next_by_size()]
    names.append(plan.next_by_time(start + 60 * SECOND) or "")
    names.append(plan.next_by_size())

    assert names == ["t-0830.pcap", "t-0830.pcap1", "t-0830.pcap2", "t-0831.pcap", "t-0831.pcap1"]


def test_w_with_g_stops_after_n_files() -> None:
    plan = Plan(Rotation("g-%s.pcap", seconds_ns=SECOND, files=2))

    plan.first(0)
    second = plan.next_by_time(SECOND)
    third = plan.next_by_time(2 * SECOND)

    assert second == "g-1.pcap"
    assert third is None


def test_percent_percent_is_not_a_time_field() -> None:
    assert has_time_fields("x-%H.pcap")
    assert not has_time_fields("100%%.pcap")
    assert file_name(
        "100%%-%Y.pcap", when_ns=local_ns("2026-01-02 03:04:05"), number=0, width=0
    ) == ("100%-2026.pcap")


def test_a_record_goes_in_while_the_file_is_not_larger_than_the_size() -> None:
    # 24 bytes of header, then 100-byte records, against 250 bytes: 24, 124, 224 -> 3 records
    # go in (the file is then 324 bytes: at most one record past the size, as tcpdump).
    assert records_that_fit(24, 250, [100] * 10) == (3, 300)
    assert records_that_fit(300, 250, [100] * 10) == (0, 0)
    assert records_that_fit(250, 250, [100, 50]) == (1, 100)
    assert records_that_fit(0, 250, []) == (0, 0)


@pytest.mark.parametrize(
    ("text", "size"), [("100", 100_000_000), ("1", 1_000_000), ("0.5", 500_000), (".001", 1000)]
)
def test_c_counts_millions_of_bytes_exactly(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "0", "-1", "1e6", "10M", "0.0000001"])
def test_what_is_not_a_size_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["-C", "1"], "need files: give -w FILE"),
        (["-w", "-", "-G", "5"], "need files"),
        (["-w", "x.pcap", "-W", "3"], "-W counts rotated files: it needs -C SIZE or -G"),
        (["-w", "x.pcap", "-z", "gzip"], "-z runs on each rotated file"),
        (["-w", "x-%H.pcap", "-C", "1", "-G", "60", "-W", "3"], "-W with both -C and -G"),
        (["-w", "x.pcap", "-G", "60"], "has no time fields"),
        (["-w", "x.pcap", "-C", "1", "-z", "no-such-program-here"], "no such program"),
        (["-w", "x.pcap", "-C", "1", "-z", "gzip -9"], "a program without arguments"),
        (["-w", "x.pcap", "-C", "0"], "must be more than zero"),
        (["-w", "x.pcap", "-G", "1.5"], "whole number"),
        (["-w", "x.pcap.xz"], "ddump compresses only to gzip (.gz) and zstd (.zst)"),
    ],
)
def test_bad_combinations_are_usage_errors_that_say_what_is_wrong(
    argv: list[str], says: str
) -> None:
    with pytest.raises(UsageError, match=None) as caught:
        parse_args(["in.pcap", *argv])
    assert says in str(caught.value)


def test_good_combinations_parse_to_a_rotation() -> None:
    options = parse_args(["in.pcap", "-w", "f-%H.PCAPNG.GZ", "-G", "600", "-W", "6", "-z", "true"])

    assert options.format == "pcapng"  # the extension is matched in any case, under .gz
    assert options.rotation == Rotation("f-%H.PCAPNG.GZ", None, 600 * SECOND, 6, "true")
    check(options.rotation)


def test_gz_names_are_recognized_in_any_case() -> None:
    assert compression_of("x.pcap.gz") == compression_of("X.PCAP.GZ") == "gzip"
    assert compression_of("x.pcap") is None
    assert without_compression("x.pcapng.Gz") == "x.pcapng"


def test_a_zst_name_without_the_zstandard_module_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(compress.importlib.util, "find_spec", lambda name: None)

    with pytest.raises(UsageError, match="writing zstd needs the zstandard module"):
        parse_args(["in.pcap", "-w", "x.PCAP.ZST"])


def test_zstd_frames_each_end_a_complete_file() -> None:
    zstandard = pytest.importorskip("zstandard")
    stream = ZstdStream()
    first = stream.compress(b"a" * 1000) + stream.end_member()
    both = first + stream.compress(b"b" * 1000) + stream.end_member()

    def read(data: bytes) -> bytes:
        reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
        return bytes(reader.read())

    assert read(first) == b"a" * 1000
    assert read(both) == b"a" * 1000 + b"b" * 1000


def test_gzip_members_each_end_a_complete_file() -> None:
    stream = GzipStream()
    first = stream.compress(b"a" * 1000) + stream.end_member()
    second = stream.compress(b"b" * 1000)
    cut = first + second  # killed before the second member ended

    assert gzip.decompress(first) == b"a" * 1000
    assert gzip.decompress(first + second + stream.end_member()) == b"a" * 1000 + b"b" * 1000
    with pytest.raises(EOFError):
        gzip.decompress(cut)
    assert zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(cut) == b"a" * 1000
    assert stream.end_member() == b""  # nothing pending: no empty member
