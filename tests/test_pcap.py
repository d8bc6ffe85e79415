"""ddump.pcap: headers, the stream parser, garbage detection, link-type conversion."""

from __future__ import annotations

import itertools
import random
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddump.errors import PcapFormatError
from ddump.pcap import (
    DEFAULT_SNAPLEN,
    LINKTYPE_ETHERNET,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    PcapHeader,
    PcapStreamParser,
    Record,
    can_convert,
    convert_records,
    encode_records,
    linktype_name,
    output_linktype,
)
from tests.conftest import require_tool

# --- fixtures, one comment per field ---------------------------------------------------------

GLOBAL_LE_NANO_SLL2 = bytes.fromhex(
    "4d3cb2a1"  # magic (nano), little-endian
    "0200"  # version_major 2
    "0400"  # version_minor 4
    "00000000"  # thiszone
    "00000000"  # sigfigs
    "00000400"  # snaplen 262144
    "14010000"  # linktype 276 (LINUX_SLL2)
)

GLOBAL_BE_MICRO_SLL = bytes.fromhex(
    "a1b2c3d4"  # magic (micro), big-endian
    "0002"  # version_major 2
    "0004"  # version_minor 4
    "00000000"  # thiszone
    "00000000"  # sigfigs
    "0000ffff"  # snaplen 65535
    "00000071"  # linktype 113 (LINUX_SLL)
)

RECORD_LE_NANO = bytes.fromhex(
    "00f15365"  # ts_sec 1700000000
    "15cd5b07"  # ts_nsec 123456789
    "04000000"  # caplen 4
    "3c000000"  # orig_len 60
    "deadbeef"  # packet data
)

RECORD_BE_MICRO = bytes.fromhex(
    "6553f100"  # ts_sec 1700000000
    "0001e240"  # ts_usec 123456
    "00000004"  # caplen 4
    "0000003c"  # orig_len 60
    "deadbeef"  # packet data
)

RECORD_BE_MICRO_AS_LE_NANO = bytes.fromhex(
    "00f15365"  # ts_sec 1700000000
    "00ca5b07"  # ts_nsec 123456000
    "04000000"  # caplen 4
    "3c000000"  # orig_len 60
    "deadbeef"  # packet data
)

IPV4_UDP = bytes.fromhex(
    "4500"  # IPv4, IHL 5, TOS 0
    "0020"  # total length 32
    "0000"  # id
    "4000"  # don't fragment
    "40"  # ttl 64
    "11"  # protocol UDP
    "aea5"  # header checksum
    "c6120001"  # src 198.18.0.1
    "c6120002"  # dst 198.18.0.2
    "04d2"  # sport 1234
    "162e"  # dport 5678
    "000c"  # UDP length 12
    "0000"  # no UDP checksum
    "64646d70"  # payload "ddmp"
)

SLL_HEADER = bytes.fromhex(
    "0000"  # packet type 0 (to us)
    "0001"  # ARPHRD_ETHER
    "0006"  # link-layer address length 6
    "0200000000010000"  # source address, padded to 8
    "0800"  # protocol IPv4
)

SLL2_HEADER = bytes.fromhex(
    "0800"  # protocol IPv4
    "0000"  # reserved (MBZ)
    "00000002"  # interface index 2
    "0001"  # ARPHRD_ETHER
    "00"  # packet type 0 (to us)
    "06"  # link-layer address length 6
    "0200000000010000"  # source address, padded to 8
)

NGINX_401 = (
    b"<html>\r\n<head><title>401 Authorization Required</title></head>\r\n<body>\r\n"
    b"<center><h1>401 Authorization Required</h1></center>\r\n"
    b"<hr><center>nginx/1.22.1</center>\r\n</body>\r\n</html>\r\n"
)

PCAPNG_SHB = bytes.fromhex(
    "0a0d0d0a"  # block type: Section Header Block
    "1c000000"  # block total length 28
    "4d3c2b1a"  # byte-order magic
    "0100"  # major version 1
    "0000"  # minor version 0
    "ffffffffffffffff"  # section length unknown
    "1c000000"  # block total length again
)

NS = 1_000_000_000


def le_nano_record(ts: int, data: bytes, origlen: int | None = None) -> Record:
    sec, nsec = divmod(ts, NS)
    size = len(data) if origlen is None else origlen
    return ts, struct.pack("<IIII", sec, nsec, len(data), size) + data


def encode_stream(
    linktype: int, packets: list[tuple[int, int, bytes]], *, nano: bool, big_endian: bool
) -> bytes:
    """A pcap stream in any encoding, from (sec, frac, data) with frac in the stream's units."""
    header = PcapHeader(linktype, nano=nano, big_endian=big_endian).to_bytes()
    layout = struct.Struct(">IIII" if big_endian else "<IIII")
    body = b"".join(layout.pack(sec, frac, len(d), len(d)) + d for sec, frac, d in packets)
    return header + body


def parse_all(stream: bytes) -> list[Record]:
    parser = PcapStreamParser()
    records = parser.feed(stream)
    parser.close()
    return records


# --- global header ----------------------------------------------------------------------------


def test_le_nano_header_decodes_field_by_field() -> None:
    header = PcapHeader.parse(GLOBAL_LE_NANO_SLL2)

    assert header == PcapHeader(LINKTYPE_LINUX_SLL2, DEFAULT_SNAPLEN, nano=True, big_endian=False)
    assert header.to_bytes() == GLOBAL_LE_NANO_SLL2


def test_be_micro_header_decodes_field_by_field() -> None:
    header = PcapHeader.parse(GLOBAL_BE_MICRO_SLL)

    assert header == PcapHeader(LINKTYPE_LINUX_SLL, 65535, nano=False, big_endian=True)
    assert header.to_bytes() == GLOBAL_BE_MICRO_SLL


@pytest.mark.parametrize("nano", [True, False])
@pytest.mark.parametrize("big_endian", [True, False])
def test_header_round_trips_in_every_byte_order_and_precision(nano: bool, big_endian: bool) -> None:
    header = PcapHeader(LINKTYPE_ETHERNET, 1500, nano=nano, big_endian=big_endian)

    assert PcapHeader.parse(header.to_bytes()) == header


def test_header_of_unknown_version_is_refused() -> None:
    data = bytearray(GLOBAL_LE_NANO_SLL2)
    data[4:6] = (3).to_bytes(2, "little")

    with pytest.raises(PcapFormatError, match=r"unsupported pcap version 3\.4"):
        PcapHeader.parse(bytes(data))


def test_short_header_is_refused() -> None:
    with pytest.raises(PcapFormatError, match="24 bytes, got only 10"):
        PcapHeader.parse(GLOBAL_LE_NANO_SLL2[:10])


# --- records and normalization ----------------------------------------------------------------


def test_le_nano_records_pass_through_byte_for_byte() -> None:
    records = parse_all(GLOBAL_LE_NANO_SLL2 + RECORD_LE_NANO + RECORD_LE_NANO)

    assert records == [(1_700_000_000_123_456_789, RECORD_LE_NANO)] * 2


def test_big_endian_micro_record_becomes_le_nano_with_exact_timestamp() -> None:
    records = parse_all(GLOBAL_BE_MICRO_SLL + RECORD_BE_MICRO)

    assert records == [(1_700_000_000_123_456_000, RECORD_BE_MICRO_AS_LE_NANO)]


@pytest.mark.parametrize("nano", [True, False])
@pytest.mark.parametrize("big_endian", [True, False])
def test_every_input_encoding_yields_the_same_le_nano_records(nano: bool, big_endian: bool) -> None:
    frac = 999_999_999 if nano else 999_999
    stream = encode_stream(
        LINKTYPE_ETHERNET,
        [(4_294_967_295, frac, b"x" * 60), (0, 0, b"")],
        nano=nano,
        big_endian=big_endian,
    )

    records = parse_all(stream)

    last_ns = 999_999_999 if nano else 999_999_000
    assert records == [
        le_nano_record(4_294_967_295 * NS + last_ns, b"x" * 60),
        le_nano_record(0, b""),
    ]


def test_micro_field_beyond_one_second_carries_into_seconds() -> None:
    stream = encode_stream(LINKTYPE_ETHERNET, [(10, 1_500_000, b"p")], nano=False, big_endian=False)

    [(ts, data)] = parse_all(stream)

    assert ts == 11_500_000_000
    assert data[:8] == struct.pack("<II", 11, 500_000_000)


def test_parser_counts_records_and_bytes() -> None:
    parser = PcapStreamParser()
    stream = GLOBAL_LE_NANO_SLL2 + RECORD_LE_NANO * 3

    parser.feed(stream[:30])
    parser.feed(stream[30:])

    assert parser.header is not None
    assert parser.header.linktype == LINKTYPE_LINUX_SLL2
    assert (parser.records, parser.bytes_in) == (3, len(stream))


def test_header_is_known_before_any_record() -> None:
    parser = PcapStreamParser()

    assert parser.feed(GLOBAL_BE_MICRO_SLL) == []
    assert parser.header == PcapHeader(LINKTYPE_LINUX_SLL, 65535, nano=False, big_endian=True)


def test_encode_records_concatenates_record_bytes() -> None:
    records = [le_nano_record(1, b"a"), le_nano_record(2, b"bc")]

    assert encode_records(records) == records[0][1] + records[1][1]
    assert parse_all(GLOBAL_LE_NANO_SLL2 + encode_records(records)) == records


packets = st.lists(
    st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 999_999), st.binary(max_size=80)),
    max_size=12,
)


@settings(deadline=None, max_examples=300)
@given(
    packets=packets,
    nano=st.booleans(),
    big_endian=st.booleans(),
    cuts=st.lists(st.integers(0, 2000), max_size=20),
)
def test_any_chunking_yields_the_same_records_as_one_feed(
    packets: list[tuple[int, int, bytes]], nano: bool, big_endian: bool, cuts: list[int]
) -> None:
    stream = encode_stream(LINKTYPE_ETHERNET, packets, nano=nano, big_endian=big_endian)
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    parser = PcapStreamParser()

    records: list[Record] = []
    for start, end in itertools.pairwise(bounds):
        records += parser.feed(stream[start:end])
    parser.close()

    scale = 1 if nano else 1000
    assert records == parse_all(stream)
    assert records == [le_nano_record(sec * NS + frac * scale, d) for sec, frac, d in packets]


def test_one_megabyte_fed_a_byte_at_a_time_stays_linear() -> None:
    # Quadratic re-joining of the tail would take minutes here; the timeout catches it.
    stream = GLOBAL_LE_NANO_SLL2 + le_nano_record(5, bytes(200_000))[1] + RECORD_LE_NANO
    parser = PcapStreamParser()

    records = [rec for i in range(len(stream)) for rec in parser.feed(stream[i : i + 1])]

    assert [ts for ts, _ in records] == [5, 1_700_000_000_123_456_789]


# --- garbage and truncation -------------------------------------------------------------------


def test_nginx_error_page_is_reported_as_html_with_a_preview() -> None:
    with pytest.raises(PcapFormatError) as caught:
        PcapStreamParser().feed(NGINX_401)

    message = str(caught.value)
    assert message.startswith("not a pcap stream: got HTML/text: ")
    assert "'<html><head><title>401 Authorization Required" in message


def test_json_body_is_reported_as_json() -> None:
    body = b'{"status": "ok", "tcpdump": "tcpdump version 4.99.3"}\n'

    with pytest.raises(PcapFormatError, match=r"got JSON: '\{\"status\": \"ok\""):
        PcapStreamParser().feed(body)


def test_random_bytes_are_reported_as_binary_with_hex() -> None:
    noise = random.Random(7).randbytes(64)

    with pytest.raises(PcapFormatError, match="unknown binary data: " + noise[:4].hex(" ")):
        PcapStreamParser().feed(noise)


def test_pcapng_gets_its_own_message() -> None:
    with pytest.raises(PcapFormatError, match=r"got pcapng .* ddump reads classic pcap"):
        PcapStreamParser().feed(PCAPNG_SHB)


def test_garbage_is_caught_before_a_whole_header_arrives() -> None:
    with pytest.raises(PcapFormatError, match="HTML/text: '<htm'"):
        PcapStreamParser().feed(b"<htm")


def test_empty_stream_closes_cleanly() -> None:
    parser = PcapStreamParser()

    parser.close()

    assert parser.header is None


def test_stream_cut_mid_record_reports_missing_bytes_on_close() -> None:
    parser = PcapStreamParser()
    parser.feed(GLOBAL_LE_NANO_SLL2 + RECORD_LE_NANO + RECORD_LE_NANO[:-3])

    expected = r"record 2 ends 3 bytes short \(got 17 of the 20-byte record\)"
    with pytest.raises(PcapFormatError, match=expected):
        parser.close()


def test_stream_cut_inside_a_record_header_is_reported() -> None:
    parser = PcapStreamParser()
    parser.feed(GLOBAL_LE_NANO_SLL2 + RECORD_LE_NANO[:5])

    expected = r"record 1 ends 11 bytes short \(got 5 of the 16-byte record header\)"
    with pytest.raises(PcapFormatError, match=expected):
        parser.close()


def test_stream_cut_inside_the_global_header_is_reported() -> None:
    parser = PcapStreamParser()
    parser.feed(GLOBAL_BE_MICRO_SLL[:7])

    with pytest.raises(PcapFormatError, match="inside the pcap global header: got 7 of 24"):
        parser.close()


def test_caplen_beyond_the_snapshot_length_is_corruption() -> None:
    absurd = bytes.fromhex(
        "00f15365"  # ts_sec
        "00000000"  # ts_nsec
        "ffffffff"  # caplen 4294967295
        "ffffffff"  # orig_len
    )

    with pytest.raises(PcapFormatError, match="record 2: caplen 4294967295 is larger than 262144"):
        PcapStreamParser().feed(GLOBAL_LE_NANO_SLL2 + RECORD_LE_NANO + absurd)


@pytest.mark.parametrize(
    ("snaplen", "caplen", "ok"),
    [(65535, 262144, True), (1 << 20, 1 << 19, True), (1 << 20, (1 << 20) + 1, False)],
)
def test_caplen_limit_is_the_larger_of_snaplen_and_default(
    snaplen: int, caplen: int, ok: bool
) -> None:
    header = PcapHeader(LINKTYPE_ETHERNET, snaplen, nano=False, big_endian=True).to_bytes()
    record_header = struct.pack(">IIII", 1, 0, caplen, caplen)
    parser = PcapStreamParser()

    if ok:
        assert parser.feed(header + record_header) == []
    else:
        with pytest.raises(PcapFormatError, match=f"caplen {caplen} is larger"):
            parser.feed(header + record_header)


# --- link types -------------------------------------------------------------------------------


def test_sll_becomes_sll2_with_interface_zero_and_longer_lengths() -> None:
    [(ts, data)] = convert_records(
        [le_nano_record(7, SLL_HEADER + IPV4_UDP, origlen=100)],
        LINKTYPE_LINUX_SLL,
        LINKTYPE_LINUX_SLL2,
    )

    sll2_no_ifindex = SLL2_HEADER[:4] + bytes(4) + SLL2_HEADER[8:]
    assert (ts, data) == le_nano_record(7, sll2_no_ifindex + IPV4_UDP, origlen=104)


def test_sll2_becomes_sll_dropping_the_interface_index() -> None:
    converted = convert_records(
        [le_nano_record(7, SLL2_HEADER + IPV4_UDP)], LINKTYPE_LINUX_SLL2, LINKTYPE_LINUX_SLL
    )

    assert converted == [le_nano_record(7, SLL_HEADER + IPV4_UDP)]


def test_sll_sll2_round_trips_byte_for_byte_except_ifindex() -> None:
    sll = [le_nano_record(1, SLL_HEADER + IPV4_UDP), le_nano_record(2, SLL_HEADER)]
    sll2 = [le_nano_record(1, SLL2_HEADER + IPV4_UDP)]

    there = convert_records(sll, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2)
    back = convert_records(sll2, LINKTYPE_LINUX_SLL2, LINKTYPE_LINUX_SLL)

    assert convert_records(there, LINKTYPE_LINUX_SLL2, LINKTYPE_LINUX_SLL) == sll
    [(_, again)] = convert_records(back, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2)
    ifindex = slice(16 + 4, 16 + 8)
    assert again[ifindex] == bytes(4)
    assert again[: ifindex.start] + again[ifindex.stop :] == (
        sll2[0][1][: ifindex.start] + sll2[0][1][ifindex.stop :]
    )


@pytest.mark.parametrize("kept", [0, 1, 5, 13, 15])
@pytest.mark.parametrize(
    ("src", "dst", "link"),
    [
        (LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2, SLL_HEADER),
        (LINKTYPE_LINUX_SLL2, LINKTYPE_LINUX_SLL, SLL2_HEADER),
    ],
)
def test_truncated_link_header_converts_without_crash(
    kept: int, src: int, dst: int, link: bytes
) -> None:
    [(ts, data)] = convert_records([le_nano_record(3, link[:kept], origlen=60)], src, dst)

    _, _, caplen, origlen = struct.unpack_from("<IIII", data)
    assert ts == 3
    assert caplen == len(data) - 16 <= origlen
    assert origlen == 60 + (4 if dst == LINKTYPE_LINUX_SLL2 else -4)


def test_conversion_matrix() -> None:
    assert can_convert(LINKTYPE_ETHERNET, LINKTYPE_ETHERNET)
    assert can_convert(LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2)
    assert can_convert(LINKTYPE_LINUX_SLL2, LINKTYPE_LINUX_SLL)
    assert not can_convert(LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL2)
    records = [le_nano_record(1, b"frame")]
    assert convert_records(records, LINKTYPE_ETHERNET, LINKTYPE_ETHERNET) == records
    with pytest.raises(PcapFormatError, match=r"ETHERNET \(1\) to LINUX_SLL2 \(276\)"):
        convert_records(records, LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL2)


def test_linktype_names() -> None:
    assert linktype_name(LINKTYPE_LINUX_SLL2) == "LINUX_SLL2 (276)"
    assert linktype_name(LINKTYPE_LINUX_SLL) == "LINUX_SLL (113)"
    assert linktype_name(4242) == "unknown (4242)"


# --- a real reader ----------------------------------------------------------------------------


def test_tcpdump_reads_what_we_write_including_converted_sll2(tmp_path: Path) -> None:
    tcpdump = require_tool("tcpdump")
    # Input as an old libpcap would send it: big-endian micro LINUX_SLL.
    stream = encode_stream(
        LINKTYPE_LINUX_SLL,
        [
            (1_700_000_000, 123_456, SLL_HEADER + IPV4_UDP),
            (1_700_000_001, 0, SLL_HEADER + IPV4_UDP),
        ],
        nano=False,
        big_endian=True,
    )
    records = convert_records(parse_all(stream), LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2)
    path = tmp_path / "out.pcap"
    path.write_bytes(PcapHeader(LINKTYPE_LINUX_SLL2).to_bytes() + encode_records(records))

    result = subprocess.run(
        [tcpdump, "-nn", "--nano", "-tt", "-r", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )

    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    assert lines[0].startswith("1700000000.123456000 ")
    assert "IP 198.18.0.1.1234 > 198.18.0.2.5678: UDP, length 4" in lines[0]
    assert "LINUX_SLL2" in result.stderr


@pytest.mark.parametrize(("nano", "big_endian"), [(True, False), (False, True)])
@pytest.mark.parametrize("split", [None, 30, 60])
def test_good_records_before_a_bad_caplen_travel_with_the_error(
    nano: bool, big_endian: bool, split: int | None
) -> None:
    good = encode_stream(276, [(1, 1, b"one"), (2, 2, b"two")], nano=nano, big_endian=big_endian)
    order = ">" if big_endian else "<"
    stream = good + struct.pack(order + "IIII", 3, 3, 0xFFFFFFFF, 0xFFFFFFFF) + b"junk"
    parser = PcapStreamParser()
    kept = parser.feed(stream[:split]) if split else []

    with pytest.raises(PcapFormatError) as caught:
        parser.feed(stream[split:] if split else stream)

    assert [data[16:] for _, data in [*kept, *caught.value.records]] == [b"one", b"two"]
    assert parser.records == 2


def test_output_linktype_prefers_sll2_when_fleets_mix_and_else_the_first() -> None:
    assert output_linktype([LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2]) == LINKTYPE_LINUX_SLL2
    assert output_linktype([LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL]) == LINKTYPE_LINUX_SLL
    assert output_linktype([LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL2]) == LINKTYPE_ETHERNET


def test_a_full_size_sll_record_stays_within_the_snaplen_as_sll2() -> None:
    # SLL -> SLL2 adds 4 bytes: a record of the largest snapshot length would become longer
    # than readers accept, so it is cut back, orig_len keeping the whole size.
    sll = struct.pack(">HHH8sH", 0, 1, 6, b"\x02" * 8, 0x0800)
    frame = sll + b"\x45" + b"\x00" * (DEFAULT_SNAPLEN - len(sll) - 1)
    record = struct.pack("<IIII", 1, 2, len(frame), len(frame)) + frame
    [(_, converted)] = convert_records(
        [(10**9 + 2, record)], LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2
    )
    caplen, origlen = struct.unpack_from("<II", converted, 8)
    assert (caplen, origlen, len(converted)) == (DEFAULT_SNAPLEN, DEFAULT_SNAPLEN + 4, 16 + caplen)
