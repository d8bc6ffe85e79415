"""Capture files in every format mergecap reads: pcapng (as Wireshark, dumpcap and editcap
write it) and gzip-compressed pcap or pcapng, merged exactly, checked against mergecap."""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

from tests.conftest import require_tool
from tests.fake_worker import pcap_stream
from tests.test_file_merge import OLD, ddump_files, mergecap, records_of, strict_order, write_files

ETHER = 1
EN10MB_FRAME = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + b"ether-frame"


def editcap(*args: str) -> None:
    subprocess.run([require_tool("editcap"), *args], check=True, timeout=60)


def tshark_fields(path: Path, *fields: str) -> list[list[str]]:
    argv = [require_tool("tshark"), "-r", str(path), "-T", "fields"]
    for name in fields:
        argv += ["-e", name]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout
    return [line.split("\t") for line in out.splitlines()]


def three_files(tmp_path: Path) -> list[Path]:
    stamps = [[OLD + i * 3000 + f * 1000 for i in range(4000)] for f in range(3)]
    return write_files(tmp_path, stamps)


def test_pcapng_files_from_editcap_merge_like_their_pcap_originals(tmp_path: Path) -> None:
    originals = three_files(tmp_path)
    converted = []
    for path, kind in zip(originals, ["pcapng", "pcapng", "pcap"], strict=True):
        target = path.with_suffix(f".conv.{kind}")
        editcap("-F", kind, str(path), str(target))  # "pcap": microseconds, another header
        converted.append(target)
    out, reference = tmp_path / "ddump.pcap", tmp_path / "reference.pcap"

    result = ddump_files(converted, out)

    assert result.returncode == 0, result.stderr
    mergecap(converted, reference)
    assert records_of(out) == records_of(reference)
    assert strict_order(out)


def test_gzip_compressed_pcap_and_pcapng_are_read(tmp_path: Path) -> None:
    a, b, c = three_files(tmp_path)
    b_ng = tmp_path / "b.pcapng"
    editcap("-F", "pcapng", str(b), str(b_ng))
    a_gz, b_gz = tmp_path / "a.pcap.gz", tmp_path / "b.pcapng.gz"
    a_gz.write_bytes(gzip.compress(a.read_bytes()))
    b_gz.write_bytes(
        gzip.compress(b_ng.read_bytes()[:5000]) + gzip.compress(b_ng.read_bytes()[5000:])
    )
    out, reference = tmp_path / "ddump.pcap", tmp_path / "reference.pcap"

    result = ddump_files([a_gz, b_gz, c], out)

    assert result.returncode == 0, result.stderr
    mergecap([a, b, c], reference)
    assert records_of(out) == records_of(reference)


def test_several_sections_are_read_one_after_another(tmp_path: Path) -> None:
    early, late, other = write_files(
        tmp_path,
        [
            [OLD + i * 3000 for i in range(3000)],
            [OLD + 10**10 + i * 3000 for i in range(3000)],
            [OLD + i * 5000 + 1 for i in range(5000)],
        ],
    )
    parts = []
    for path in (early, late):
        ng = path.with_suffix(".pcapng")
        editcap("-F", "pcapng", str(path), str(ng))
        parts.append(ng.read_bytes())
    sections = tmp_path / "sections.pcapng"
    sections.write_bytes(b"".join(parts))  # what `cat early.pcapng late.pcapng` leaves
    out, reference = tmp_path / "ddump.pcap", tmp_path / "reference.pcap"

    result = ddump_files([sections, other], out)

    assert result.returncode == 0, result.stderr
    mergecap([early, late, other], reference)
    assert records_of(out) == records_of(reference)


def test_interfaces_of_other_link_types_keep_their_own_in_pcapng(tmp_path: Path) -> None:
    sll2, other = three_files(tmp_path)[:2]
    ether = tmp_path / "ether.pcap"
    ether.write_bytes(
        pcap_stream([(OLD + i * 3000 + 500, EN10MB_FRAME) for i in range(100)], linktype=ETHER)
    )
    mixed = tmp_path / "mixed.pcapng"
    subprocess.run(
        [require_tool("mergecap"), "-F", "pcapng", "-w", str(mixed), str(sll2), str(ether)],
        check=True,
        timeout=60,
    )
    out = tmp_path / "out.pcapng"

    result = ddump_files([mixed, other], out, "--format", "pcapng")

    assert result.returncode == 0, result.stderr
    rows = tshark_fields(out, "frame.interface_name", "frame.time_epoch", "frame.protocols")
    assert len(rows) == 4000 * 2 + 100
    names = {name for name, _, _ in rows}
    assert any(name.startswith(str(mixed)) for name in names)
    assert any(name.startswith(str(other)) for name in names)
    assert sum("eth:" in protocols for _, _, protocols in rows) == 100
    assert strict_order(out)


def test_mixed_link_types_into_pcap_are_refused_naming_the_way_out(tmp_path: Path) -> None:
    sll2 = three_files(tmp_path)[0]
    ether = tmp_path / "ether.pcap"
    ether.write_bytes(pcap_stream([(OLD + 5, EN10MB_FRAME)], linktype=ETHER))
    mixed = tmp_path / "mixed.pcapng"
    subprocess.run(
        [require_tool("mergecap"), "-F", "pcapng", "-w", str(mixed), str(sll2), str(ether)],
        check=True,
        timeout=60,
    )

    result = ddump_files([mixed], tmp_path / "out.pcap")

    assert result.returncode == 1
    assert "write --format pcapng" in result.stderr


def test_a_truncated_gzip_file_fails_that_file_and_keeps_what_it_had(tmp_path: Path) -> None:
    a, b = three_files(tmp_path)[:2]
    cut = tmp_path / "cut.pcap.gz"
    whole = gzip.compress(a.read_bytes())
    cut.write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "out.pcap"

    result = ddump_files([cut, b], out)

    assert result.returncode == 1
    assert "cut.pcap.gz" in result.stderr and "gzip" in result.stderr
    got = records_of(out)
    assert len(got) > 4000  # all of b, and what the cut file held before the cut
    assert [ts for ts, _ in got] == sorted(ts for ts, _ in got)


def test_pcapng_output_of_targets_with_other_snaplens_is_read_by_tcpdump(tmp_path: Path) -> None:
    a, b = three_files(tmp_path)[:2]
    small = tmp_path / "small.pcap"
    editcap("-F", "nsecpcap", "-s", "40", str(b), str(small))  # snaplen 40 in its header
    out = tmp_path / "out.pcapng"

    result = ddump_files([a, small], out)

    assert result.returncode == 0, result.stderr
    read = subprocess.run(
        [require_tool("tcpdump"), "-nn", "-r", str(out)], capture_output=True, text=True, timeout=60
    )
    assert read.returncode == 0, read.stderr
    assert len(read.stdout.splitlines()) == 8000
