"""ddump.pcapng_read against files Wireshark's tools wrote, and against what they read.

The sources are nanosecond pcaps (read by ddump's own pcap parser, the reference);
editcap, tshark, mergecap and dumpcap turn them into pcapng, and the records ddump reads back
must be the same, timestamp and bytes. Where no pcap can be the reference (several link types,
hand-written blocks), tshark's own reading of the file is.
"""

from __future__ import annotations

import random
import socket
import struct
import subprocess
import time
from decimal import Decimal
from heapq import merge
from pathlib import Path

from ddump.pcap import PcapStreamParser
from ddump.pcapng_read import InputInterface, PcapngStreamParser
from ddump.records import Record
from tests.conftest import require_root, require_tool
from tests.test_pcapng_read import block, epb, idb, option, shb

NS = 1_000_000_000
T0 = 1_700_000_000 * NS + 123_456_789
SLL2, ETHERNET = 276, 1


def write_pcap(path: Path, linktype: int, count: int, seed: int, step_ns: int = 1_234_567) -> None:
    """A little-endian nanosecond pcap of `count` packets of random sizes (14 to 1500 bytes)."""
    rng = random.Random(seed)
    out = [struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 262144, linktype)]
    ts = T0 + seed
    for i in range(count):
        ts += 1 + rng.randrange(step_ns)
        data = bytes([seed, i & 0xFF]) + rng.randbytes(12 + rng.randrange(1487))
        out.append(struct.pack("<IIII", ts // NS, ts % NS, len(data), len(data) + i % 3) + data)
    path.write_bytes(b"".join(out))


def pcap_records(path: Path) -> list[Record]:
    parser = PcapStreamParser()
    records = list(parser.feed(path.read_bytes()))
    parser.close()
    return records


def pcapng_runs(path: Path, chunk: int = 65536) -> list[tuple[InputInterface, list[Record]]]:
    """The file's runs, fed in `chunk`-byte pieces, adjacent runs of one interface joined."""
    data = path.read_bytes()
    parser = PcapngStreamParser()
    runs: list[tuple[InputInterface, list[Record]]] = []
    for start in range(0, len(data), chunk):
        for iface, batch in parser.feed(data[start : start + chunk]):
            if runs and runs[-1][0] == iface:
                runs[-1][1].extend(batch)
            else:
                runs.append((iface, list(batch)))
    parser.close()
    return runs


def all_records(path: Path) -> list[Record]:
    return [rec for _, batch in pcapng_runs(path) for rec in batch]


def run(*argv: str | Path) -> str:
    done = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def tshark_view(path: Path) -> list[tuple[int, int, int, int]]:
    """(interface id, timestamp in ns, frame length, captured length) per packet, by tshark."""
    out = run(
        require_tool("tshark"), "-r", path, "-T", "fields",
        "-e", "frame.interface_id", "-e", "frame.time_epoch", "-e", "frame.len",
        "-e", "frame.cap_len",
    )  # fmt: skip
    view = []
    for line in out.splitlines():
        ifid, epoch, length, caplen = line.split("\t")
        view.append((int(ifid or 0), int(Decimal(epoch) * NS), int(length), int(caplen)))
    return view


def our_view(path: Path) -> list[tuple[int, int, int, int]]:
    """The same, as ddump reads the file."""
    view = []
    for iface, batch in pcapng_runs(path):
        for ts, rec in batch:
            caplen, length = struct.unpack_from("<II", rec, 8)
            view.append((iface.id, ts, length, caplen))
    return view


def test_editcap_pcapng_from_a_nanosecond_pcap_gives_the_same_records(tmp_path: Path) -> None:
    editcap = require_tool("editcap")
    write_pcap(tmp_path / "src.pcap", SLL2, 500, seed=1)
    run(editcap, "-F", "pcapng", tmp_path / "src.pcap", tmp_path / "out.pcapng")
    [(iface, records)] = pcapng_runs(tmp_path / "out.pcapng", chunk=1000)
    assert (iface.linktype, iface.snaplen, iface.section, iface.id) == (SLL2, 262144, 0, 0)
    assert records == pcap_records(tmp_path / "src.pcap")


def test_microsecond_pcapng_reads_as_the_microsecond_pcap_does(tmp_path: Path) -> None:
    editcap = require_tool("editcap")
    write_pcap(tmp_path / "src.pcap", ETHERNET, 300, seed=2)
    run(editcap, "-F", "pcap", tmp_path / "src.pcap", tmp_path / "us.pcap")  # µs pcap
    run(editcap, "-F", "pcapng", tmp_path / "us.pcap", tmp_path / "us.pcapng")  # no if_tsresol
    assert b"\x09\x00\x01\x00" not in (tmp_path / "us.pcapng").read_bytes()[:200]
    micro = pcap_records(tmp_path / "us.pcap")
    assert all_records(tmp_path / "us.pcapng") == micro
    assert all(ts % 1000 == 0 for ts, _ in micro)


def test_tshark_written_pcapng_gives_the_same_records(tmp_path: Path) -> None:
    write_pcap(tmp_path / "src.pcap", SLL2, 300, seed=3)
    run(require_tool("tshark"), "-r", tmp_path / "src.pcap", "-w", tmp_path / "t.pcapng")
    assert (tmp_path / "t.pcapng").read_bytes()[:4] == bytes.fromhex("0a0d0d0a")
    assert all_records(tmp_path / "t.pcapng") == pcap_records(tmp_path / "src.pcap")


def test_editcap_snaplen_cut_reads_as_tshark_shows_it(tmp_path: Path) -> None:
    editcap = require_tool("editcap")
    write_pcap(tmp_path / "src.pcap", ETHERNET, 200, seed=4)
    run(editcap, "-F", "pcapng", "-s", "100", tmp_path / "src.pcap", tmp_path / "cut.pcapng")
    view = our_view(tmp_path / "cut.pcapng")
    assert view == tshark_view(tmp_path / "cut.pcapng")
    assert max(caplen for *_, caplen in view) == 100


def test_mergecap_of_two_link_types_gives_two_interfaces(tmp_path: Path) -> None:
    editcap = require_tool("editcap")
    write_pcap(tmp_path / "a.pcap", SLL2, 300, seed=5)
    write_pcap(tmp_path / "b.pcap", SLL2, 200, seed=6, step_ns=3_000_000)
    run(editcap, "-T", "ether", tmp_path / "b.pcap", tmp_path / "b_en10mb.pcap")
    merged = tmp_path / "m.pcapng"
    run(require_tool("mergecap"), "-F", "pcapng", "-w", merged, tmp_path / "a.pcap",
        tmp_path / "b_en10mb.pcap")  # fmt: skip
    runs = pcapng_runs(merged)
    assert {(i.linktype, i.id) for i, _ in runs} == {(SLL2, 0), (ETHERNET, 1)}
    assert len(runs) > 2  # the files interleave: runs alternate between the interfaces
    by_link = {
        link: [r for i, b in runs if i.linktype == link for r in b] for link in (SLL2, ETHERNET)
    }
    assert by_link[SLL2] == pcap_records(tmp_path / "a.pcap")
    assert by_link[ETHERNET] == pcap_records(tmp_path / "b.pcap")
    assert our_view(merged) == tshark_view(merged)


def test_concatenated_pcapng_files_are_sections_of_one_stream(tmp_path: Path) -> None:
    editcap = require_tool("editcap")
    write_pcap(tmp_path / "a.pcap", SLL2, 100, seed=7)
    write_pcap(tmp_path / "b.pcap", ETHERNET, 100, seed=8)
    run(editcap, "-F", "pcapng", tmp_path / "a.pcap", tmp_path / "a.pcapng")
    run(editcap, "-F", "pcapng", tmp_path / "b.pcap", tmp_path / "b.pcapng")
    both = tmp_path / "ab.pcapng"
    both.write_bytes((tmp_path / "a.pcapng").read_bytes() + (tmp_path / "b.pcapng").read_bytes())
    runs = pcapng_runs(both, chunk=777)
    assert [(i.section, i.id, i.linktype) for i, _ in runs] == [(0, 0, SLL2), (1, 0, ETHERNET)]
    assert [r for _, b in runs for r in b] == (
        pcap_records(tmp_path / "a.pcap") + pcap_records(tmp_path / "b.pcap")
    )
    assert our_view(both) == tshark_view(both)


def test_hand_written_big_endian_offset_and_power_of_two_sections_read_as_tshark_reads_them(
    tmp_path: Path,
) -> None:
    stream = (
        shb(">")
        + idb(ETHERNET, 0, option(14, struct.pack(">q", 3600), ">"), order=">")  # µs, +1 h
        + idb(ETHERNET, 0, option(9, b"\x94", ">"), order=">")  # 2^-20 s
        + epb(0, 1_700_000_000_123_456, bytes(60), order=">")
        + epb(1, (1_700_000_000 << 20) + 777_777, bytes(61), order=">")
        + shb()
        + idb(ETHERNET, 0, option(9, b"\x09"), option(14, struct.pack("<q", -60)))
        + epb(0, 1_700_000_000_987_654_321, bytes(62), 70)
    )
    path = tmp_path / "hand.pcapng"
    path.write_bytes(stream)
    view = our_view(path)
    assert view == tshark_view(path)
    assert [ts for _, ts, _, _ in view] == [
        1_700_003_600_123_456_000,
        1_700_000_000 * NS + 777_777 * NS // (1 << 20),  # 741.745..ms: rounded down to the ns
        1_699_999_940_987_654_321,
    ]


def test_a_simple_packet_lands_where_mergecap_puts_it(tmp_path: Path) -> None:
    """mergecap writes a packet without a timestamp right after its file's previous one."""
    mergecap = require_tool("mergecap")
    spb = block(3, struct.pack("<I", 20) + b"S" * 20)  # no timestamp
    a = shb() + idb() + epb(0, 5_000_000, b"A5" * 10) + spb + epb(0, 7_000_000, b"A7" * 10)
    (tmp_path / "a.pcapng").write_bytes(a)
    b = [struct.pack("<IIII", s, 0, 20, 20) + b"B%d" % s * 10 for s in (1, 6, 8)]
    header = struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 65535, ETHERNET)
    (tmp_path / "b.pcap").write_bytes(header + b"".join(b))
    out = tmp_path / "m.pcap"
    run(mergecap, "-F", "nsecpcap", "-w", out, tmp_path / "a.pcapng", tmp_path / "b.pcap")
    theirs = [rec[16:] for _, rec in pcap_records(out)]
    ours = merge(all_records(tmp_path / "a.pcapng"), pcap_records(tmp_path / "b.pcap"))
    assert [rec[16:] for _, rec in ours] == theirs
    assert [ts // NS for ts, _ in all_records(tmp_path / "a.pcapng")] == [5, 5, 7]


def test_dumpcap_capture_reads_as_tshark_and_editcap_read_it(tmp_path: Path) -> None:
    require_root()
    dumpcap = require_tool("dumpcap")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        port = sink.getsockname()[1]
        path = tmp_path / "lo.pcapng"
        log = tmp_path / "dumpcap.log"
        with log.open("wb") as stderr:
            capture = subprocess.Popen(
                [dumpcap, "-i", "lo", "-f", f"udp port {port}", "-c", "5", "-a", "duration:20",
                 "-w", str(path)],
                stderr=stderr,
            )  # fmt: skip
        try:
            deadline = time.monotonic() + 15
            while b"Capturing on" not in log.read_bytes() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert b"Capturing on" in log.read_bytes(), log.read_text()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
                for i in range(5):
                    sender.sendto(b"ddump %d" % i * (i + 1), ("127.0.0.1", port))
            assert capture.wait(timeout=20) == 0
        finally:
            capture.kill()
            capture.wait()
    [(iface, records)] = pcapng_runs(path, chunk=100)
    assert (iface.name, iface.linktype) == ("lo", ETHERNET)
    assert len(records) == 5
    assert all(rec.endswith(b"ddump %d" % i * (i + 1)) for i, (_, rec) in enumerate(records))
    assert our_view(path) == tshark_view(path)
    run(require_tool("editcap"), "-F", "nsecpcap", path, tmp_path / "lo.pcap")
    assert records == pcap_records(tmp_path / "lo.pcap")
