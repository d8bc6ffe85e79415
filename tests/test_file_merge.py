"""Merging capture files is exact, like mergecap: any number of files, any shape of overlap."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ddump.pcap import PcapStreamParser
from tests.conftest import require_tool
from tests.fake_worker import pcap_stream, sll2_packet

OLD = 1_600_000_000 * 10**9  # years ago: no wall-clock bound may touch these


def records_of(path: Path) -> list[tuple[int, bytes]]:
    parser = PcapStreamParser()
    records = list(parser.feed(path.read_bytes()))
    parser.close()
    return records


def ddump_files(paths: list[Path], out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ddump.cli.main", "-w", str(out), *extra, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def mergecap(paths: list[Path], out: Path) -> None:
    tool = require_tool("mergecap")
    subprocess.run(
        [tool, "-F", "nsecpcap", "-w", str(out), *map(str, paths)], check=True, timeout=300
    )


def strict_order(path: Path) -> bool:
    tool = require_tool("capinfos")
    out = subprocess.run(
        [tool, "-o", str(path)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    match = re.search(r"Strict time order:\s+(\w+)", out)
    assert match, out
    return match.group(1) == "True"


def write_files(tmp_path: Path, stamps: list[list[int]]) -> list[Path]:
    paths = []
    for index, file_stamps in enumerate(stamps):
        path = tmp_path / f"in{index:04d}.pcap"
        packets = [(ts, sll2_packet(b"f%d-%d" % (index, i))) for i, ts in enumerate(file_stamps)]
        path.write_bytes(pcap_stream(packets))
        paths.append(path)
    return paths


def assert_same_as_mergecap(tmp_path: Path, paths: list[Path]) -> list[tuple[int, bytes]]:
    out, reference = tmp_path / "ddump.pcap", tmp_path / "mergecap.pcap"
    result = ddump_files(paths, out)
    assert result.returncode == 0, result.stderr
    assert "late" not in result.stderr
    mergecap(paths, reference)
    ours, theirs = records_of(out), records_of(reference)
    assert len(ours) == len(theirs)
    assert ours == theirs
    assert strict_order(out)
    return ours


def test_rotated_files_one_after_another_merge_exactly(tmp_path: Path) -> None:
    # What `tcpdump -G`/`-C` leaves: each file covers the period after the one before.
    # More records in all than any hold-back cap, in files given in shuffled order.
    files, per_file = 120, 2500
    stamps = [[OLD + (f * per_file + i) * 1000 for i in range(per_file)] for f in range(files)]
    paths = write_files(tmp_path, stamps)
    random.Random(1).shuffle(paths)

    ours = assert_same_as_mergecap(tmp_path, paths)

    assert len(ours) == files * per_file


def test_files_of_uneven_rates_over_the_same_period_merge_exactly(tmp_path: Path) -> None:
    rng = random.Random(2)
    span = 60 * 10**9
    stamps = []
    for index in range(60):
        count = 200 + index * 80  # from 200 to 4,920 packets over the same minute
        stamps.append(sorted({OLD + rng.randrange(span) * 7 + index for _ in range(count)}))
    paths = write_files(tmp_path, stamps)

    ours = assert_same_as_mergecap(tmp_path, paths)

    assert len(ours) == sum(map(len, stamps))


def test_a_thousand_files_merge_within_a_small_open_files_limit(tmp_path: Path) -> None:
    rng = random.Random(3)
    stamps = [sorted(OLD + rng.randrange(10**9) * 1000 + f for _ in range(50)) for f in range(1000)]
    paths = write_files(tmp_path, stamps)
    out = tmp_path / "ddump.pcap"
    # A hard limit of 1,024 open files (the soft one is raised to the hard one at start): the
    # files cannot all stay open, so each is opened for a read and closed after it.
    code = (
        "import resource, sys; from ddump.cli.main import main; "
        "resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024)); sys.exit(main(sys.argv[1:]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "-w", str(out), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    reference = tmp_path / "mergecap.pcap"
    mergecap(paths, reference)
    assert records_of(out) == records_of(reference)


def test_a_file_out_of_order_in_itself_is_sorted_and_said(tmp_path: Path) -> None:
    # Disorder within what one read takes is put right (mergecap keeps the file's order);
    # the summary says the file itself was out of order, and nothing is lost.
    inner = [OLD + ts for ts in [10, 20, 15, 30, 25, 40]]  # two earlier than the one before
    paths = write_files(tmp_path, [inner, [OLD + 12, OLD + 22, OLD + 35]])
    out = tmp_path / "ddump.pcap"

    result = ddump_files(paths, out)

    assert result.returncode == 0, result.stderr
    stamps = [ts - OLD for ts, _ in records_of(out)]
    assert stamps == [10, 12, 15, 20, 22, 25, 30, 35, 40]
    assert strict_order(out)
    assert re.search(r"in0000\.pcap: 2 records earlier than the one before them", result.stderr)
    assert "2 out of order in the file" in result.stderr


@pytest.mark.parametrize("files", [2, 7])
def test_ties_between_files_come_in_argument_order(tmp_path: Path, files: int) -> None:
    stamps = [[OLD + (i // 3) * 100 for i in range(3000)] for _ in range(files)]
    paths = write_files(tmp_path, stamps)
    out = tmp_path / "ddump.pcap"

    result = ddump_files(paths, out)

    assert result.returncode == 0, result.stderr
    ours = records_of(out)
    assert [ts for ts, _ in ours] == sorted(ts for s in stamps for ts in s)
    # Within a timestamp: every packet of the first file, then the second's, ...
    firsts = [data.rsplit(b"\0", 1)[-1] for ts, data in ours if ts == OLD]
    assert firsts == [b"f%d-%d" % (f, i) for f in range(files) for i in range(3)]
