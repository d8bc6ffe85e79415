"""pcapng output: byte-level fixtures per block, interface choice per record, real readers."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from ddump.pcap import LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2, Record
from ddump.pcapng import (
    CaptureCounts,
    Interface,
    PcapngWriter,
    block,
    option,
    options,
    parse_interfaces_header,
    section_header,
)
from ddump.pcapng_read import InputInterface, PcapngStreamParser
from tests.conftest import require_tool

NS = 1_000_000_000
T0 = 1_700_000_000 * NS  # 2023-11-14 22:13:20 UTC


def record(ts: int, data: bytes, origlen: int | None = None) -> Record:
    """A record as ddump.pcap produces it: LE nanosecond record header, then the packet."""
    header = struct.pack("<IIII", ts // NS, ts % NS, len(data), origlen or len(data))
    return ts, header + data


UDP = bytes.fromhex(
    "4500001c00010000401100007f0000017f000001"  # IPv4 127.0.0.1 -> 127.0.0.1, UDP
    "0035003500080000"  # UDP 53 -> 53, no payload
)


def sll2(ifindex: int) -> bytes:
    # protocol, reserved, ifindex, hatype, pkttype, halen, address
    return struct.pack(">HHIHBB8s", 0x0800, 0, ifindex, 1, 0, 6, b"\x02" * 6) + UDP


def sll() -> bytes:
    # pkttype, hatype, halen, address, protocol
    return struct.pack(">HHH8sH", 0, 1, 6, b"\x02" * 6, 0x0800) + UDP


def walk(data: bytes) -> list[tuple[int, bytes]]:
    """(block type, body) of every block, checking both lengths and the 32-bit alignment."""
    blocks = []
    pos = 0
    while pos < len(data):
        kind, total = struct.unpack_from("<II", data, pos)
        assert total % 4 == 0 and total >= 12, f"block at {pos}: total {total}"
        assert struct.unpack_from("<I", data, pos + total - 4)[0] == total, f"block at {pos}"
        blocks.append((kind, data[pos + 8 : pos + total - 4]))
        pos += total
    assert pos == len(data)
    return blocks


def epb_fields(body: bytes) -> tuple[int, int, bytes]:
    """(interface id, timestamp in ns, packet data) of an EPB body."""
    interface, high, low, caplen, _ = struct.unpack_from("<IIIII", body)
    return interface, high << 32 | low, body[20 : 20 + caplen]


def web1_writer(**kwargs: object) -> PcapngWriter:
    writer = PcapngWriter()
    writer.start_target(
        0,
        name="web-1",
        description="http://web-1:8475/capture",
        linktype=LINKTYPE_LINUX_SLL2,
        snaplen=262144,
        interface_names={1: "lo", 2: "eth0"},
        **kwargs,  # type: ignore[arg-type]
    )
    return writer


# ---- the worker's interface map ----


def test_interfaces_header_parses_to_an_index_to_name_map() -> None:
    assert parse_interfaces_header("1=lo,2=eth0,17=br-0a1b") == {1: "lo", 2: "eth0", 17: "br-0a1b"}


def test_interfaces_header_names_are_percent_decoded() -> None:
    assert parse_interfaces_header("3=a%2Cb%3Dc,4=caf%C3%A9,5=x%FF") == {
        3: "a,b=c",
        4: "café",
        5: "x\ufffd",  # not UTF-8: still a name, never an exception
    }


def test_interfaces_header_ignores_items_it_does_not_understand() -> None:
    assert parse_interfaces_header("1=lo,,x=eth0,2=,=3,2=eth0,...") == {1: "lo", 2: "eth0"}
    assert parse_interfaces_header("") == {}


# ---- options and blocks ----


def test_option_value_is_padded_to_32_bits() -> None:
    assert option(2, b"lo") == bytes.fromhex(
        "0200 0200"  # code 2, length 2
        "6c6f 0000"  # "lo", 2 bytes of padding
    )
    assert option(9, b"\x09") == bytes.fromhex("0900 0100 09000000")
    assert option(2, b"eth0") == bytes.fromhex("0200 0400 65746830")  # no padding needed


def test_option_list_ends_with_endofopt_and_is_absent_when_empty() -> None:
    assert options([(1, b"abc")]) == bytes.fromhex("0100 0300 616263000000 0000")
    assert options([]) == b""


def test_block_repeats_its_total_length_after_the_padded_body() -> None:
    assert block(0x0BAD, b"\x01\x02\x03\x04\x05") == bytes.fromhex(
        "ad0b0000"  # block type
        "14000000"  # total length 20 = 8 + 8 (5 bytes padded) + 4
        "0102030405000000"  # body, padded to 32 bits
        "14000000"  # total length again
    )


def test_section_header_block_names_the_application_and_the_fleet() -> None:
    assert section_header("ddump", "web") == bytes.fromhex(
        "0a0d0d0a"  # block type SHB
        "34000000"  # total length 52
        "4d3c2b1a"  # byte-order magic 0x1A2B3C4D, little-endian
        "0100 0000"  # version 1.0
        "ffffffffffffffff"  # section length: unknown (-1)
        "0400 0500 6464756d70 000000"  # shb_userappl "ddump"
        "0100 0300 776562 00"  # opt_comment "web"
        "0000 0000"  # opt_endofopt
        "34000000"  # total length again
    )


def test_interface_description_block_has_name_url_nanoseconds_and_filter() -> None:
    idb = Interface("web-1:eth0", "http://w", LINKTYPE_LINUX_SLL2, 262144, "udp").to_bytes()
    assert idb == bytes.fromhex(
        "01000000"  # block type IDB
        "44000000"  # total length 68
        "1401 0000"  # link type 276 LINUX_SLL2, reserved
        "00000400"  # snaplen 262144
        "0200 0a00 7765622d313a65746830 0000"  # if_name "web-1:eth0", 2 bytes padding
        "0300 0800 687474703a2f2f77"  # if_description "http://w"
        "0900 0100 09 000000"  # if_tsresol 9: nanoseconds
        "0b00 0400 00 756470"  # if_filter: 0 = libpcap filter string, "udp"
        "0000 0000"  # opt_endofopt
        "44000000"  # total length again
    )


def test_enhanced_packet_block_carries_the_record_with_a_64_bit_nanosecond_timestamp() -> None:
    writer = PcapngWriter()
    writer.start_target(0, name="a", description="", linktype=LINKTYPE_ETHERNET, snaplen=65535)
    ts = (1 << 32) + 2  # 4.294967298 s: timestamp high word 1, low word 2
    [(out_ts, epb)] = writer.encode(0, [record(ts, b"abcde", origlen=60)])
    assert out_ts == ts
    assert epb == bytes.fromhex(
        "06000000"  # block type EPB
        "28000000"  # total length 40
        "00000000"  # interface id 0
        "01000000 02000000"  # timestamp high, low (units of if_tsresol: ns)
        "05000000"  # captured length 5
        "3c000000"  # original length 60
        "6162636465 000000"  # packet data, padded to 32 bits
        "28000000"  # total length again
    )


def test_interface_statistics_block_counts_packets_written_and_the_capture_times() -> None:
    writer = PcapngWriter()
    writer.start_target(
        0,
        name="a",
        description="",
        linktype=LINKTYPE_ETHERNET,
        snaplen=65535,
        start_ns=(1 << 32) + 2,
    )
    writer.encode(0, [record(T0, b"x")])
    writer.take_blocks()
    assert writer.statistics((2 << 32) + 3) == bytes.fromhex(
        "05000000"  # block type ISB
        "40000000"  # total length 64
        "00000000"  # interface id 0
        "02000000 03000000"  # timestamp high, low: the end
        "0200 0800 01000000 02000000"  # isb_starttime
        "0300 0800 02000000 03000000"  # isb_endtime
        "0800 0800 0100000000000000"  # isb_usrdeliv: 1 packet
        "0000 0000"  # opt_endofopt
        "40000000"  # total length again
    )


@given(st.lists(st.binary(max_size=70), min_size=1, max_size=20), st.sampled_from([0, 1, 2, 7]))
def test_every_packet_size_gives_an_aligned_block_holding_the_exact_bytes(
    packets: list[bytes], ifindex: int
) -> None:
    writer = web1_writer()
    records = [record(T0 + i, sll2(ifindex)[: len(p) % 30] + p) for i, p in enumerate(packets)]
    encoded = writer.encode(0, records)
    blocks = walk(writer.take_blocks() + b"".join(epb for _, epb in encoded))
    epbs = [body for kind, body in blocks if kind == 6]
    assert [epb_fields(body)[1:] for body in epbs] == [(ts, rec[16:]) for ts, rec in records]


# ---- which interface each packet came through ----


def test_sll2_records_map_to_one_interface_block_per_ifindex_named_host_colon_name() -> None:
    writer = web1_writer()
    records = [record(T0 + 1, sll2(2)), record(T0 + 2, sll2(1)), record(T0 + 3, sll2(2))]
    encoded = writer.encode(0, records)
    assert [i.name for i in writer.interfaces] == ["web-1:eth0", "web-1:lo"]
    assert [epb_fields(epb[8:-4])[0] for _, epb in encoded] == [0, 1, 0]
    idbs = walk(writer.take_blocks())
    assert [kind for kind, _ in idbs] == [1, 1]  # queued in id order, once each
    assert writer.take_blocks() == b""
    writer.encode(0, [record(T0 + 4, sll2(1))])
    assert writer.take_blocks() == b""  # known interfaces: no new block


def test_an_ifindex_missing_from_the_map_is_named_by_its_index() -> None:
    writer = web1_writer()
    writer.encode(0, [record(T0, sll2(9))])
    assert writer.interfaces[0].name == "web-1:#9"


def test_a_record_cut_before_its_ifindex_goes_to_the_targets_any_block() -> None:
    writer = web1_writer()
    writer.encode(0, [record(T0, sll2(2)[:6]), record(T0 + 1, b"")])
    assert [i.name for i in writer.interfaces] == ["web-1:any"]


def test_other_link_types_get_one_block_per_target_and_keep_their_link_type() -> None:
    writer = web1_writer()
    writer.start_target(
        1,
        name="db-1",
        description="http://db-1:8475/capture",
        linktype=LINKTYPE_LINUX_SLL,
        snaplen=96,
    )
    writer.start_target(
        2,
        name="old.pcap",
        description="file",
        linktype=LINKTYPE_ETHERNET,
        snaplen=1500,
        device=None,
    )
    writer.encode(1, [record(T0, sll()), record(T0 + 1, sll())])
    writer.encode(2, [record(T0, b"\xff" * 14)])
    writer.encode(0, [record(T0, sll2(1))])
    assert [(i.name, i.linktype, i.snaplen) for i in writer.interfaces] == [
        ("db-1:any", LINKTYPE_LINUX_SLL, 96),
        ("old.pcap", LINKTYPE_ETHERNET, 1500),
        ("web-1:lo", LINKTYPE_LINUX_SLL2, 262144),
    ]


def test_a_reconnected_target_reuses_its_interface_blocks() -> None:
    writer = web1_writer(start_ns=T0)
    writer.encode(0, [record(T0 + 1, sll2(2))])
    writer.start_target(
        0,
        name="web-1",
        description="http://web-1:8475/capture",
        linktype=LINKTYPE_LINUX_SLL2,
        snaplen=262144,
        interface_names={2: "eth0", 3: "eth1"},
        start_ns=T0 + 10 * NS,
    )
    writer.encode(0, [record(T0 + 11 * NS, sll2(2)), record(T0 + 12 * NS, sll2(3))])
    assert [i.name for i in writer.interfaces] == ["web-1:eth0", "web-1:eth1"]
    assert writer.packets == [2, 1]


def test_a_uniform_snaplen_replaces_each_targets_own() -> None:
    writer = PcapngWriter(snaplen=262144)
    writer.start_target(0, name="a", description="", linktype=LINKTYPE_LINUX_SLL, snaplen=96)
    writer.encode(0, [record(T0, sll())])
    assert writer.interfaces[0].snaplen == 262144


# ---- statistics ----


def test_statistics_count_written_packets_per_interface_and_forget_discarded_ones() -> None:
    writer = web1_writer()
    encoded = writer.encode(0, [record(T0 + i, sll2(1 + i % 2)) for i in range(5)])
    writer.discard(encoded[3:])  # -c 3
    isbs = [body for kind, body in walk(writer.statistics(T0 + NS)) if kind == 5]
    delivered = [struct.unpack_from("<Q", body, len(body) - 12)[0] for body in isbs]
    assert delivered == [2, 1]  # lo: 0, 2; eth0: 1


def test_capture_counts_go_to_the_targets_any_block_and_silent_targets_still_appear() -> None:
    writer = web1_writer()
    writer.start_target(1, name="db-1", description="", linktype=LINKTYPE_LINUX_SLL, snaplen=96)
    writer.encode(0, [record(T0, sll2(1))])
    writer.take_blocks()
    blocks = walk(writer.statistics(T0 + NS, {0: CaptureCounts(received=7, dropped=2)}))
    assert [kind for kind, _ in blocks] == [1, 1, 5, 5, 5]  # IDBs first, then one ISB each
    assert [i.name for i in writer.interfaces] == ["web-1:lo", "web-1:any", "db-1:any"]
    any_isb = blocks[3][1]
    assert bytes.fromhex("0400 0800 0700000000000000") in any_isb  # isb_ifrecv 7
    assert bytes.fromhex("0500 0800 0200000000000000") in any_isb  # isb_ifdrop 2


# ---- real readers ----


def two_target_file(path: Path) -> None:
    """web-1 (SLL2: eth0, lo and an unlisted ifindex) and db-1 (SLL), merged by timestamp."""
    writer = web1_writer(filter="udp", start_ns=T0)
    writer.start_target(
        1,
        name="db-1",
        description="http://db-1:8475/capture",
        linktype=LINKTYPE_LINUX_SLL,
        snaplen=262144,
    )
    web = writer.encode(
        0,
        [
            record(T0 + 123_456_789, sll2(2)),
            record(T0 + NS + 1, sll2(1)),
            record(T0 + 3 * NS + 999_999_999, sll2(9)),
        ],
    )
    db = writer.encode(1, [record(T0 + 500_000_000, sll()), record(T0 + 2 * NS, sll())])
    merged = sorted(web + db)
    data = section_header("ddump 0.1.0", "web-1, db-1") + writer.take_blocks()
    data += b"".join(epb for _, epb in merged) + writer.statistics(T0 + 5 * NS)
    path.write_bytes(data)


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def test_tshark_shows_each_packets_host_interface_and_nanosecond_time(tmp_path: Path) -> None:
    tshark = require_tool("tshark")
    two_target_file(tmp_path / "out.pcapng")
    fields = run(
        tshark, "-r", str(tmp_path / "out.pcapng"), "-T", "fields",
        "-e", "frame.interface_name", "-e", "frame.time_epoch",
    )  # fmt: skip
    assert fields.returncode == 0, fields.stderr
    assert fields.stdout.splitlines() == [
        "web-1:eth0\t1700000000.123456789",
        "db-1:any\t1700000000.500000000",
        "web-1:lo\t1700000001.000000001",
        "db-1:any\t1700000002.000000000",
        "web-1:#9\t1700000003.999999999",
    ]


def test_capinfos_and_editcap_accept_the_file(tmp_path: Path) -> None:
    capinfos = require_tool("capinfos")
    editcap = require_tool("editcap")
    tshark = require_tool("tshark")
    two_target_file(tmp_path / "out.pcapng")
    info = run(capinfos, str(tmp_path / "out.pcapng"))
    assert info.returncode == 0, info.stderr
    assert "Number of packets:   5" in info.stdout
    assert "Number of interfaces in file: 4" in info.stdout
    assert "Capture application: ddump 0.1.0" in info.stdout
    assert "Name = web-1:eth0" in info.stdout and "Filter string = udp" in info.stdout
    assert "nanoseconds" in info.stdout
    copy = run(editcap, str(tmp_path / "out.pcapng"), str(tmp_path / "copy.pcapng"))
    assert copy.returncode == 0, copy.stderr
    names = run(
        tshark, "-r", str(tmp_path / "copy.pcapng"), "-T", "fields", "-e", "frame.interface_name"
    )
    assert names.stdout.split() == ["web-1:eth0", "db-1:any", "web-1:lo", "db-1:any", "web-1:#9"]


def test_tcpdump_reads_one_link_type_but_refuses_mixed_link_types(tmp_path: Path) -> None:
    tcpdump = require_tool("tcpdump")
    two_target_file(tmp_path / "mixed.pcapng")
    mixed = run(tcpdump, "-nn", "-r", str(tmp_path / "mixed.pcapng"))
    assert mixed.returncode != 0
    assert "different from the type of the first interface" in mixed.stderr
    writer = web1_writer()
    epbs = writer.encode(0, [record(T0 + 1, sll2(1)), record(T0 + 2, sll2(2))])
    single = section_header("ddump") + writer.take_blocks() + b"".join(e for _, e in epbs)
    (tmp_path / "single.pcapng").write_bytes(single + writer.statistics(T0 + 3))
    read = run(
        tcpdump, "-nn", "-tt", "--time-stamp-precision=nano", "-r", str(tmp_path / "single.pcapng")
    )
    assert read.returncode == 0, read.stderr
    assert [line.split()[0] for line in read.stdout.splitlines()] == [
        "1700000000.000000001",
        "1700000000.000000002",
    ]


# ---- pcapng inputs: each input interface under its own block ----


def file_writer(writer: PcapngWriter | None = None) -> PcapngWriter:
    writer = writer or PcapngWriter()
    writer.start_target(
        0,
        name="edge.pcapng",
        description="/captures/edge.pcapng",
        linktype=LINKTYPE_ETHERNET,
        snaplen=262144,
        device=None,
    )
    return writer


ETH0_IN = InputInterface(LINKTYPE_ETHERNET, 1500, "eth0", "uplink", section=0, id=0)
UNNAMED_IN = InputInterface(LINKTYPE_LINUX_SLL, 96, None, None, section=0, id=1)


def test_input_interfaces_get_blocks_named_target_colon_if_name_or_id() -> None:
    writer = file_writer()
    eth0 = writer.encode_input(0, ETH0_IN, [record(T0, b"\xff" * 14)])
    unnamed = writer.encode_input(0, UNNAMED_IN, [record(T0 + 1, sll()), record(T0 + 2, sll())])
    assert [(i.name, i.description, i.linktype, i.snaplen) for i in writer.interfaces] == [
        ("edge.pcapng:eth0", "/captures/edge.pcapng", LINKTYPE_ETHERNET, 1500),
        ("edge.pcapng:#1", "/captures/edge.pcapng", LINKTYPE_LINUX_SLL, 96),
    ]
    assert [epb_fields(epb[8:-4])[:2] for _, epb in eth0 + unnamed] == [
        (0, T0),
        (1, T0 + 1),
        (1, T0 + 2),
    ]
    assert [kind for kind, _ in walk(writer.take_blocks())] == [1, 1]
    writer.encode_input(0, ETH0_IN, [record(T0 + 3, b"\xff" * 14)])
    assert writer.take_blocks() == b""  # a known interface: no new block
    assert writer.packets == [2, 2]


def test_a_forced_snaplen_replaces_the_inputs_own() -> None:
    writer = file_writer(PcapngWriter(snaplen=262144))
    writer.encode_input(0, UNNAMED_IN, [record(T0, sll())])
    assert writer.interfaces[0].snaplen == 262144


def test_like_interfaces_of_two_sections_share_a_block_and_others_do_not() -> None:
    writer = file_writer()
    again = InputInterface(LINKTYPE_ETHERNET, 1500, "eth0", None, section=1, id=0)
    other_link = InputInterface(LINKTYPE_LINUX_SLL2, 1500, "eth0", None, section=2, id=0)
    for iface in (ETH0_IN, again, other_link):
        writer.encode_input(0, iface, [record(T0, b"x")])
    assert [(i.name, i.linktype) for i in writer.interfaces] == [
        ("edge.pcapng:eth0", LINKTYPE_ETHERNET),
        ("edge.pcapng:eth0", LINKTYPE_LINUX_SLL2),
    ]
    assert writer.packets == [2, 1]


def test_input_interfaces_are_counted_in_the_statistics_and_written_ones_only() -> None:
    writer = file_writer()
    encoded = writer.encode_input(0, ETH0_IN, [record(T0 + i, b"x") for i in range(4)])
    writer.discard(encoded[3:])
    blocks = walk(writer.statistics(T0 + NS))
    assert [kind for kind, _ in blocks] == [1, 5]  # no extra block for the file target
    assert struct.unpack_from("<Q", blocks[1][1], len(blocks[1][1]) - 12)[0] == 3


def test_tshark_reads_a_pcapng_input_rewritten_under_its_target(tmp_path: Path) -> None:
    tshark = require_tool("tshark")
    source = section_header("x") + Interface("eth0", "", LINKTYPE_ETHERNET, 1500).to_bytes()
    writer0 = PcapngWriter()
    writer0.start_target(0, name="x", description="", linktype=LINKTYPE_ETHERNET, snaplen=1500)
    source += b"".join(epb for _, epb in writer0.encode(0, [record(T0 + 5, b"\xaa" * 20)]))
    parser = PcapngStreamParser()
    [(iface, batch)] = parser.feed(source)
    writer = file_writer()
    epbs = writer.encode_input(0, iface, batch)
    out = section_header("ddump") + writer.take_blocks() + b"".join(e for _, e in epbs)
    (tmp_path / "out.pcapng").write_bytes(out + writer.statistics(T0 + NS))
    fields = run(
        tshark, "-r", str(tmp_path / "out.pcapng"), "-T", "fields",
        "-e", "frame.interface_name", "-e", "frame.time_epoch", "-e", "frame.len",
    )  # fmt: skip
    assert fields.returncode == 0, fields.stderr
    assert fields.stdout.splitlines() == ["edge.pcapng:eth0\t1700000000.000000005\t20"]
