"""ddump.pcapng_read: pcapng blocks to records, byte for byte, and files written by Wireshark."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddump import records
from ddump.errors import PcapFormatError
from ddump.pcapng_read import (
    InputInterface,
    PcapngFormatError,
    PcapngStreamParser,
)
from ddump.records import Record, Records
from tests.conftest import require

NS = 1_000_000_000

# --- fixtures, one comment per field ---------------------------------------------------------

SHB_LE = bytes.fromhex(
    "0a0d0d0a"  # block type: Section Header Block
    "1c000000"  # total length 28
    "4d3c2b1a"  # byte-order magic 0x1A2B3C4D, little-endian
    "0100 0000"  # version 1.0
    "ffffffffffffffff"  # section length: unknown
    "1c000000"  # total length again
)

IDB_LE_ETH0 = bytes.fromhex(
    "01000000"  # block type: Interface Description Block
    "20000000"  # total length 32
    "0100 0000"  # link type 1 (ETHERNET), reserved
    "ffff0000"  # snaplen 65535
    "0200 0400 65746830"  # if_name "eth0"
    "0000 0000"  # opt_endofopt
    "20000000"  # total length again
)  # no if_tsresol: microseconds

EPB_LE = bytes.fromhex(
    "06000000"  # block type: Enhanced Packet Block
    "24000000"  # total length 36
    "00000000"  # interface id 0
    "240a0600"  # timestamp high
    "40222018"  # timestamp low: 0x00060a24_18202240 = 1,700,000,000,123,456 µs
    "04000000"  # captured length 4
    "3c000000"  # original length 60
    "deadbeef"  # packet data
    "24000000"  # total length again
)

RECORD = bytes.fromhex(
    "00f15365"  # ts_sec 1700000000, little-endian
    "00ca5b07"  # ts_nsec 123456000
    "04000000"  # caplen 4
    "3c000000"  # orig_len 60
    "deadbeef"  # packet data
)

SHB_BE = bytes.fromhex(
    "0a0d0d0a"  # block type: Section Header Block (the same in both orders)
    "0000001c"  # total length 28, big-endian
    "1a2b3c4d"  # byte-order magic, big-endian
    "0001 0000"  # version 1.0
    "ffffffffffffffff"  # section length: unknown
    "0000001c"  # total length again
)

IDB_BE_ETH0 = bytes.fromhex(
    "00000001"  # block type: Interface Description Block
    "00000020"  # total length 32
    "0001 0000"  # link type 1 (ETHERNET), reserved
    "0000ffff"  # snaplen 65535
    "0002 0004 65746830"  # if_name "eth0"
    "0000 0000"  # opt_endofopt
    "00000020"  # total length again
)

EPB_BE = bytes.fromhex(
    "00000006"  # block type: Enhanced Packet Block
    "00000024"  # total length 36
    "00000000"  # interface id 0
    "00060a24"  # timestamp high
    "18202240"  # timestamp low: 1,700,000,000,123,456 µs
    "00000004"  # captured length 4
    "0000003c"  # original length 60
    "deadbeef"  # packet data (bytes, not a number: never swapped)
    "00000024"  # total length again
)

US = 1_700_000_000_123_456
ETH0 = InputInterface(1, 65535, "eth0", None, section=0, id=0)


def block(kind: int, body: bytes, order: str = "<") -> bytes:
    """A block: type, total length, body padded to 32 bits, total length again."""
    body += bytes(-len(body) & 3)
    return (
        struct.pack(order + "II", kind, len(body) + 12)
        + body
        + struct.pack(order + "I", len(body) + 12)
    )


def option(code: int, value: bytes, order: str = "<") -> bytes:
    return struct.pack(order + "HH", code, len(value)) + value + bytes(-len(value) & 3)


def shb(order: str = "<") -> bytes:
    return block(0x0A0D0D0A, struct.pack(order + "IHHq", 0x1A2B3C4D, 1, 0, -1), order)


def idb(linktype: int = 1, snaplen: int = 65535, *opts: bytes, order: str = "<") -> bytes:
    body = struct.pack(order + "HHI", linktype, 0, snaplen)
    if opts:
        body += b"".join(opts) + option(0, b"", order)
    return block(1, body, order)


def epb(ifid: int, units: int, data: bytes, origlen: int | None = None, order: str = "<") -> bytes:
    fields = (ifid, units >> 32, units & 0xFFFFFFFF, len(data), origlen or len(data))
    return block(6, struct.pack(order + "5I", *fields) + data, order)


def record(ns: int, data: bytes, origlen: int | None = None) -> Record:
    """A record as ddump.pcap produces it: LE nanosecond record header, then the data."""
    return ns, struct.pack("<IIII", ns // NS, ns % NS, len(data), origlen or len(data)) + data


def parse(stream: bytes) -> list[tuple[InputInterface, list[Record]]]:
    parser = PcapngStreamParser()
    runs = parser.feed(stream)
    parser.close()
    return [(iface, list(batch)) for iface, batch in runs]


def coalesce(
    runs: Sequence[tuple[InputInterface, Records]],
) -> list[tuple[InputInterface, list[Record]]]:
    """Adjacent runs of the same interface as one (a feed's end may cut a run)."""
    out: list[tuple[InputInterface, list[Record]]] = []
    for iface, batch in runs:
        if out and out[-1][0] == iface:
            out[-1][1].extend(batch)
        else:
            out.append((iface, list(batch)))
    return out


# --- blocks to records -----------------------------------------------------------------------


def test_enhanced_packet_becomes_a_little_endian_nanosecond_record() -> None:
    assert parse(SHB_LE + IDB_LE_ETH0 + EPB_LE) == [(ETH0, [(US * 1000, RECORD)])]


def test_a_big_endian_section_gives_the_same_records() -> None:
    assert parse(SHB_BE + IDB_BE_ETH0 + EPB_BE) == [(ETH0, [(US * 1000, RECORD)])]


def test_interface_fields_come_from_the_idb_and_its_options() -> None:
    described = idb(
        276, 96, option(2, b"any"), option(3, b"Pseudo-device\0"), option(1, b"a comment")
    )
    [(iface, _)] = parse(shb() + described + epb(0, 1, b"x"))
    assert iface == InputInterface(276, 96, "any", "Pseudo-device", section=0, id=0)


@pytest.mark.parametrize(
    ("tsresol", "units", "ns"),
    [
        (None, 1_700_000_000_123_456, 1_700_000_000_123_456_000),  # default: µs
        (b"\x06", 1_700_000_000_123_456, 1_700_000_000_123_456_000),  # 10^-6
        (b"\x09", 1_700_000_000_123_456_789, 1_700_000_000_123_456_789),  # 10^-9
        (b"\x00", 1_700_000_000, 1_700_000_000 * NS),  # 10^0: seconds
        (b"\x0c", 12_345_678_901_234_567, 12_345_678_901_234),  # ps: rounded down
        (b"\x94", (1_700_000_000 << 20) + (1 << 19), 1_700_000_000 * NS + 500_000_000),  # 2^-20
        (b"\x94", (1_700_000_000 << 20) + 1, 1_700_000_000 * NS + 953),  # 953.67 ns: down
        (b"\x80", 1_700_000_000, 1_700_000_000 * NS),  # 2^0
        (b"\xa0", 1_700_000_000 << 32 | 1, 1_700_000_000 * NS),  # 2^-32: 0.23 ns, down
    ],
)
def test_if_tsresol_sets_the_unit_and_nothing_finer_than_a_nanosecond_survives(
    tsresol: bytes | None, units: int, ns: int
) -> None:
    opts = [option(9, tsresol)] if tsresol is not None else []
    [(_, [(ts, rec)])] = parse(shb() + idb(1, 0, *opts) + epb(0, units, b"x"))
    assert ts == ns
    assert struct.unpack_from("<II", rec) == (ns // NS, ns % NS)


@pytest.mark.parametrize("seconds", [3600, -3600])
def test_if_tsoffset_adds_whole_seconds(seconds: int) -> None:
    opts = (option(9, b"\x09"), option(14, struct.pack("<q", seconds)))
    [(_, [(ts, _)])] = parse(shb() + idb(1, 0, *opts) + epb(0, 1_700_000_000 * NS + 7, b"x"))
    assert ts == (1_700_000_000 + seconds) * NS + 7


def test_if_tsoffset_in_a_big_endian_section() -> None:
    opts = (option(14, struct.pack(">q", 60), ">"),)
    stream = shb(">") + idb(1, 0, *opts, order=">") + epb(0, 5_000_000, b"x", order=">")
    [(_, [(ts, _)])] = parse(stream)
    assert ts == 65 * NS


def test_packets_come_in_runs_per_interface_in_file_order() -> None:
    stream = (
        shb()
        + idb(1, 0, option(2, b"eth0"))
        + idb(276, 0, option(2, b"any"))
        + epb(0, 1, b"a")
        + epb(0, 2, b"b")
        + epb(1, 3, b"c")
        + epb(0, 4, b"d")
    )
    eth0 = InputInterface(1, 262144, "eth0", None, 0, 0)
    any_ = InputInterface(276, 262144, "any", None, 0, 1)
    assert [(i, [r[1][16:] for r in b]) for i, b in parse(stream)] == [
        (eth0, [b"a", b"b"]),
        (any_, [b"c"]),
        (eth0, [b"d"]),
    ]


def test_a_new_section_resets_the_interfaces_and_may_change_byte_order() -> None:
    stream = (
        shb()
        + idb(1, 0, option(2, b"eth0"))
        + idb(1, 0, option(2, b"eth1"))
        + epb(1, 1, b"a")
        + shb(">")
        + idb(113, 0, option(2, b"lo", ">"), order=">")
        + epb(0, 2, b"b", order=">")
    )
    runs = parse(stream)
    assert [i for i, _ in runs] == [
        InputInterface(1, 262144, "eth1", None, section=0, id=1),
        InputInterface(113, 262144, "lo", None, section=1, id=0),
    ]
    bad = shb() + idb() + idb() + shb() + idb() + epb(1, 1, b"x")
    with pytest.raises(PcapFormatError, match="describes only interfaces 0 to 0"):
        parse(bad)


def test_other_blocks_are_skipped_by_their_length() -> None:
    stream = (
        shb()
        + block(4, bytes.fromhex("0100 0400 7f000001 6c6f63616c00 0000") + bytes(4))  # NRB
        + idb()
        + block(5, struct.pack("<III", 0, 0, 0))  # Interface Statistics Block
        + block(10, struct.pack("<II", 0x544C534B, 4) + b"keys")  # Decryption Secrets Block
        + block(0x00000BAD, struct.pack("<I", 32473) + b"custom")  # custom, copiable
        + block(0x40000BAD, struct.pack("<I", 32473))  # custom, not to be copied
        + block(0x12345678, b"")  # a type nobody defined: a bare 12-byte block
        + epb(0, 1, b"x")
    )
    assert [len(b) for _, b in parse(stream)] == [1]


def test_simple_packet_block_takes_the_previous_packets_time_and_interface_0() -> None:
    spb = bytes.fromhex(
        "03000000"  # block type: Simple Packet Block
        "14000000"  # total length 20
        "06000000"  # original length 6
        "61626364"  # data "abcd": the first 4 (the interface's snaplen) of 6 bytes
        "14000000"  # total length again
    )
    stream = shb() + idb(1, 4) + spb + epb(0, 5, b"e") + spb
    [(iface, records)] = parse(stream)
    assert iface.snaplen == 4
    assert records == [record(0, b"abcd", 6), record(5000, b"e"), record(5000, b"abcd", 6)]


def test_simple_packet_block_needs_an_interface() -> None:
    with pytest.raises(PcapFormatError, match=r"Simple Packet Block at byte 28: .* no Interface"):
        parse(shb() + block(3, struct.pack("<I", 1) + b"x"))


def test_obsolete_packet_block_is_read_like_an_enhanced_one() -> None:
    pb = bytes.fromhex(
        "02000000"  # block type: Packet Block (obsolete)
        "24000000"  # total length 36
        "0000"  # interface id 0 (16 bits)
        "0300"  # drops count 3
        "00000000 40420f00"  # timestamp high, low: 1,000,000 µs
        "03000000"  # captured length 3
        "40000000"  # original length 64
        "78797a00"  # data "xyz", padding
        "24000000"  # total length again
    )
    assert parse(shb() + idb() + pb)[0][1] == [record(NS, b"xyz", 64)]


# --- cuts and refusals -------------------------------------------------------------------------


def test_a_packet_longer_than_the_snaplen_is_cut_keeping_its_original_length() -> None:
    parser = PcapngStreamParser()
    [(_, batch)] = parser.feed(shb() + idb(1, 4) + epb(0, 1, b"abcdef", 100))
    assert list(batch) == [record(1000, b"abcd", 100)]
    assert parser.truncated == 1


def test_a_packet_over_262144_bytes_is_cut_even_with_no_snaplen() -> None:
    parser = PcapngStreamParser()
    big = bytes(range(256)) * 1025  # 262400 bytes
    [(iface, batch)] = parser.feed(shb() + idb(1, 0) + epb(0, 1, big) + epb(0, 2, b"ok"))
    assert iface.snaplen == 262144
    assert list(batch) == [record(1000, big[:262144], len(big)), record(2000, b"ok")]
    assert parser.truncated == 1


def error_for(stream: bytes) -> str:
    parser = PcapngStreamParser()
    with pytest.raises(PcapFormatError) as caught:
        parser.feed(stream)
        parser.close()
    return str(caught.value)


def test_a_packet_of_an_undescribed_interface_is_refused_with_its_offset() -> None:
    message = error_for(shb() + idb() + epb(1, 1, b"x"))
    assert message == (
        "pcapng Enhanced Packet Block at byte 48: interface id 1, but its section describes "
        "only interfaces 0 to 0: the file is corrupt"
    )
    assert "describes no interface" in error_for(shb() + epb(0, 1, b"x"))


def test_block_lengths_are_checked_with_the_offset_of_the_block() -> None:
    head = shb() + idb()
    odd = struct.pack("<II", 6, 33) + bytes(21) + struct.pack("<I", 33)
    assert error_for(head + odd) == (
        "pcapng Enhanced Packet Block at byte 48: total length 33 is not a multiple of 4: "
        "the file is corrupt"
    )
    differing = epb(0, 1, b"abcd")[:-4] + struct.pack("<I", 40)
    assert "total length 36 at its start but 40 at its end" in error_for(head + differing)
    tiny = struct.pack("<II", 0x99, 8) + bytes(4)
    assert "block of type 0x00000099 at byte 48: total length 8 is shorter than the 12" in (
        error_for(head + tiny)
    )
    short_epb = block(6, bytes(12))
    assert "shorter than the 32 bytes" in error_for(head + short_epb)


@pytest.mark.parametrize("chunk", [1, 7, 48, 1000])
def test_the_offset_in_a_message_does_not_depend_on_how_the_stream_was_fed(chunk: int) -> None:
    stream = shb() + idb() + epb(0, 1, b"abc") + block(5, bytes(12)) + epb(2, 1, b"x")
    parser = PcapngStreamParser()
    with pytest.raises(PcapFormatError) as caught:
        for start in range(0, len(stream), chunk):
            parser.feed(stream[start : start + chunk])
    assert "Enhanced Packet Block at byte 108: interface id 2" in str(caught.value)


def test_a_captured_length_beyond_its_block_is_refused() -> None:
    lying = epb(0, 1, b"abcd")
    lying = lying[:20] + struct.pack("<I", 9) + lying[24:]
    assert "captured length 9 does not fit in its 36-byte block" in error_for(shb() + idb() + lying)


def test_a_stream_cut_inside_a_block_is_reported_at_close() -> None:
    parser = PcapngStreamParser()
    stream = shb() + idb() + epb(0, 1, b"abcd")
    assert parser.feed(stream[:-5]) == []
    with pytest.raises(PcapFormatError, match=r"block at byte 48 ends 5 bytes short \(got 31 of"):
        parser.close()


def test_what_is_not_pcapng_is_named() -> None:
    assert "got classic pcap" in error_for(bytes.fromhex("d4c3b2a1") + bytes(20))
    assert "got HTML/text" in error_for(b"<html><body>Not found</body></html>")
    bad_magic = shb()[:8] + b"\x00\x11\x22\x33" + shb()[12:]
    assert "byte-order magic 00112233 is neither" in error_for(bad_magic)
    version2 = shb()[:12] + struct.pack("<H", 2) + shb()[14:]
    assert "version 2.0, and ddump reads version 1.x" in error_for(version2)


@pytest.mark.parametrize(("units", "offset"), [(1 << 63, 0), ((1 << 64) - 1, 0), (0, -1)])
def test_timestamps_outside_0_to_2_to_the_63_ns_are_refused(units: int, offset: int) -> None:
    opts = (option(9, b"\x09"), option(14, struct.pack("<q", offset)))
    message = error_for(shb() + idb(1, 0, *opts) + epb(0, units, b"x"))
    assert "is out of the range ddump keeps (0 to 2^63 ns" in message


def test_records_parsed_before_an_error_are_kept_in_the_error() -> None:
    parser = PcapngStreamParser()
    stream = shb() + idb() + epb(0, 1, b"a") + epb(0, 2, b"b") + epb(3, 3, b"c")
    with pytest.raises(PcapngFormatError) as caught:
        parser.feed(stream)
    assert [(i.id, list(b)) for i, b in caught.value.runs] == [
        (0, [record(1000, b"a"), record(2000, b"b")])
    ]


# --- any split, the same records ---------------------------------------------------------------

packets = st.lists(
    st.tuples(
        st.integers(0, 2),  # interface
        st.integers(0, (1 << 40)),  # timestamp units
        st.binary(max_size=40),  # data
        st.sampled_from(["epb", "spb", "pb", "isb", "shb"]),  # what comes before it
    ),
    max_size=25,
)


def build(items: list[tuple[int, int, bytes, str]], order: str) -> bytes:
    """A stream of sections of three interfaces (ns, µs, 2^-10 s) with packets and noise."""
    interfaces = (
        idb(1, 0, option(9, b"\x09", order), order=order)
        + idb(276, 30, option(2, b"any", order), order=order)
        + idb(
            113,
            0,
            option(9, b"\x8a", order),
            option(14, struct.pack(order + "q", 7), order),
            order=order,
        )
    )
    out = [shb(order), interfaces]
    for ifid, units, data, before in items:
        if before == "shb":
            out += [shb(order), interfaces]
        elif before == "isb":
            out.append(block(5, struct.pack(order + "III", ifid, 0, 0), order))
        elif before == "spb":
            out.append(block(3, struct.pack(order + "I", len(data)) + data, order))
        if before == "pb":
            fields = (ifid, 0, units >> 32, units & 0xFFFFFFFF, len(data), len(data))
            out.append(block(2, struct.pack(order + "HHIIII", *fields) + data, order))
        else:
            out.append(epb(ifid, units, data, order=order))
    return b"".join(out)


@settings(deadline=None, max_examples=300)
@given(packets, st.sampled_from("<>"), st.data())
def test_any_split_of_the_stream_gives_the_same_records(
    items: list[tuple[int, int, bytes, str]], order: str, data: st.DataObject
) -> None:
    stream = build(items, order)
    whole = parse(stream)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    parser = PcapngStreamParser()
    runs = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        runs += parser.feed(stream[start:end])
    parser.close()
    assert coalesce(runs) == coalesce(whole)
    assert parser.records == sum(len(b) for _, b in whole) >= len(items)
    assert parser.truncated == sum(1 for ifid, _, d, _ in items if ifid == 1 and len(d) > 30)


def test_one_byte_at_a_time() -> None:
    stream = build([(i % 3, i * 1000, bytes([i]) * i, "epb") for i in range(40)], "<")
    parser = PcapngStreamParser()
    runs = [run for i in range(len(stream)) for run in parser.feed(stream[i : i + 1])]
    parser.close()
    assert coalesce(runs) == coalesce(parse(stream))


# --- the C engine (ddump/_records.c scan_epbs) reads what the Python loop reads ---------------


@pytest.fixture(params=["c", "python"])
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "python":
        monkeypatch.setattr(records, "_c", None)
    else:
        require(records.ENGINE == "c", "needs the C part (ddump/_records.c) built")
    return str(request.param)


@settings(deadline=None, max_examples=200)
@given(packets, st.sampled_from("<>"))
def test_the_c_engine_reads_what_the_python_loop_reads(
    items: list[tuple[int, int, bytes, str]], order: str
) -> None:
    stream = build(items, order)
    ours = parse(stream)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(records, "_c", None)
        assert parse(stream) == ours


PLAIN = [epb(0, 1_700_000_000 * NS + i, b"p%d" % i) for i in range(3)]


@pytest.mark.parametrize(
    ("odd", "said"),
    [
        (epb(0, 1 << 63, b"x"), "out of the range ddump keeps"),
        (epb(0, 5, b"x")[:-4] + struct.pack("<I", 99), "36 at its start but 99 at its end"),
        (epb(0, 5, b"x")[:20] + struct.pack("<I", 5) + epb(0, 5, b"x")[24:], "does not fit"),
        (epb(7, 5, b"x"), "interface id 7"),
    ],
)
def test_an_unusual_packet_after_plain_ones_is_refused_by_either_engine(
    engine: str, odd: bytes, said: str
) -> None:
    head = shb() + idb(1, 8, option(9, b"\x09"))
    parser = PcapngStreamParser()
    with pytest.raises(PcapngFormatError, match=said) as caught:
        parser.feed(head + b"".join(PLAIN) + odd)
    [(_, batch)] = caught.value.runs
    assert [rec[16:] for _, rec in batch] == [b"p0", b"p1", b"p2"]


def test_a_cut_packet_among_plain_ones_is_cut_by_either_engine(engine: str) -> None:
    long_one = epb(0, 1_700_000_000 * NS + 9, b"0123456789", 1000)
    parser = PcapngStreamParser()
    stream = shb() + idb(1, 8, option(9, b"\x09")) + PLAIN[0] + long_one + PLAIN[1] + PLAIN[2]
    [(_, batch)] = parser.feed(stream)
    assert list(batch)[1] == record(1_700_000_000 * NS + 9, b"01234567", 1000)
    assert [rec[16:] for _, rec in batch] == [b"p0", b"01234567", b"p1", b"p2"]
    assert parser.truncated == 1


@settings(deadline=None, max_examples=500)
@given(st.binary(max_size=200), st.sampled_from("<>"))
def test_garbage_after_a_valid_start_is_refused_with_a_format_error_and_nothing_else(
    garbage: bytes, order: str
) -> None:
    stream = shb(order) + idb(1, 0, option(9, b"\x09", order), order=order) + garbage
    parser = PcapngStreamParser()
    try:
        parser.feed(stream)
        parser.close()
    except PcapFormatError as error:
        assert str(error).startswith(("pcapng ", "not a pcapng stream"))


@settings(deadline=None, max_examples=500)
@given(
    st.lists(
        st.tuples(st.sampled_from([1, 2, 3, 5, 6, 0x0A0D0D0A, 0xBAD]), st.binary(max_size=60)),
        max_size=6,
    ),
    st.sampled_from("<>"),
)
def test_well_framed_blocks_with_random_bodies_are_read_or_refused_as_format_errors(
    blocks: list[tuple[int, bytes]], order: str
) -> None:
    stream = shb(order) + idb(1, 0, order=order)
    stream += b"".join(block(kind, body, order) for kind, body in blocks)
    parser = PcapngStreamParser()
    try:
        runs = parser.feed(stream)
        parser.close()
    except PcapFormatError:
        return
    for _, batch in runs:
        for ts, rec in batch:
            sec, nsec, caplen, _ = struct.unpack_from("<IIII", rec)
            assert (sec, nsec) == ((ts // NS) & 0xFFFFFFFF, ts % NS)
            assert len(rec) == 16 + caplen <= 16 + 262144
