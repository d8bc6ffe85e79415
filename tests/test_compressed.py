"""ddump.compressed: gzip streams decoded chunk by chunk, as gunzip decodes the same files."""

from __future__ import annotations

import gzip
import itertools
import random
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddump.compressed import GzipDecoder
from ddump.errors import PcapFormatError
from ddump.pcapng_read import PcapngStreamParser, sniff
from tests.conftest import require_tool

# The smallest gzip member: the empty string, compressed.
EMPTY_MEMBER = bytes.fromhex(
    "1f8b"  # magic
    "08"  # compression method: deflate
    "00"  # flags: none
    "00000000"  # mtime: none
    "00"  # extra flags
    "ff"  # OS: unknown
    "0300"  # deflate: one final fixed-Huffman block holding only its end code
    "00000000"  # CRC-32 of nothing
    "00000000"  # uncompressed size 0
)


def decode(stream: bytes, cuts: list[int] | None = None) -> bytes:
    decoder = GzipDecoder()
    bounds = sorted(cuts or [])
    out = [
        decoder.feed(stream[start:end])
        for start, end in zip([0, *bounds], [*bounds, len(stream)], strict=True)
    ]
    decoder.close()
    return b"".join(out)


def test_the_empty_member_decodes_to_nothing() -> None:
    assert gzip.decompress(EMPTY_MEMBER) == b""
    assert decode(EMPTY_MEMBER) == b""


def test_concatenated_members_decode_to_the_concatenation() -> None:
    stream = gzip.compress(b"first ") + EMPTY_MEMBER + gzip.compress(b"second")
    decoder = GzipDecoder()
    assert decoder.feed(stream) == b"first second"
    decoder.close()
    assert decoder.members == 3


def test_zero_padding_after_the_last_member_is_ignored_as_gunzip_does() -> None:
    assert decode(gzip.compress(b"data") + bytes(512), cuts=[20, 30]) == b"data"


def test_other_bytes_after_a_member_are_refused_with_their_offset() -> None:
    member = gzip.compress(b"data")
    with pytest.raises(PcapFormatError, match=f"bytes at {len(member)} after the end of member 1"):
        decode(member + b"PK\x03\x04")
    with pytest.raises(PcapFormatError, match=f"bytes at {len(member) + 3} after the end"):
        decode(member + b"\0\0\0junk")
    with pytest.raises(PcapFormatError, match="neither another gzip member"):
        decode(member + b"\x1f")  # half a magic, then the end


def test_a_truncated_stream_is_reported_at_close() -> None:
    stream = gzip.compress(random.Random(1).randbytes(5000))
    decoder = GzipDecoder()
    decoder.feed(stream[:-4])  # the size field of the trailer is missing
    with pytest.raises(PcapFormatError, match=r"gzip stream cut short: member 1 .* truncated"):
        decoder.close()
    second = GzipDecoder()
    second.feed(stream + stream[:10])  # a second member cut inside its header
    with pytest.raises(PcapFormatError, match=f"member 2 \\(starting at byte {len(stream)}\\)"):
        second.close()


def test_corrupt_data_names_the_member() -> None:
    stream = bytearray(gzip.compress(b"x" * 1000) * 2)
    stream[-12] ^= 0xFF  # inside the second member's deflate data or CRC
    with pytest.raises(PcapFormatError, match=r"gzip member 2 .* is corrupt"):
        decode(bytes(stream))


@settings(deadline=None, max_examples=200)
@given(
    st.lists(st.binary(max_size=300), min_size=1, max_size=4),
    st.lists(st.integers(0, 2000), max_size=8),
    st.integers(0, 20),
)
def test_any_split_of_any_members_gives_the_same_bytes(
    parts: list[bytes], cuts: list[int], padding: int
) -> None:
    stream = b"".join(gzip.compress(p, compresslevel=1 + len(p) % 9) for p in parts)
    stream += bytes(padding)
    assert decode(stream, [c for c in cuts if c <= len(stream)]) == b"".join(parts)


def test_files_from_gzip_and_cat_decode_as_gunzip_decodes_them(tmp_path: Path) -> None:
    gzip_tool = require_tool("gzip")
    rng = random.Random(2)
    (tmp_path / "a").write_bytes(rng.randbytes(300_000) + bytes(300_000))
    (tmp_path / "b").write_bytes(b"pcap " * 50_000)
    subprocess.run([gzip_tool, "-k", "-9", tmp_path / "a", tmp_path / "b"], check=True)
    both = (tmp_path / "a.gz").read_bytes() + (tmp_path / "b.gz").read_bytes()
    (tmp_path / "ab.gz").write_bytes(both)
    gunzip = subprocess.run(
        [gzip_tool, "-dc", tmp_path / "ab.gz"], capture_output=True, check=True, timeout=60
    )
    decoder = GzipDecoder()
    out = b"".join(decoder.feed(both[i : i + 65536]) for i in range(0, len(both), 65536))
    decoder.close()
    assert out == gunzip.stdout == (tmp_path / "a").read_bytes() + (tmp_path / "b").read_bytes()


def test_a_gzipped_pcapng_from_editcap_reads_as_the_plain_one(tmp_path: Path) -> None:
    editcap = require_tool("editcap")
    gzip_tool = require_tool("gzip")
    # A tiny nanosecond pcap (three Ethernet frames), converted to pcapng by editcap.
    frames = [bytes([i]) * (60 + i) for i in range(3)]
    records = [
        (1_700_000_000 + i).to_bytes(4, "little")
        + (i * 1000).to_bytes(4, "little")
        + len(f).to_bytes(4, "little") * 2
        + f
        for i, f in enumerate(frames)
    ]
    header = bytes.fromhex("4d3cb2a1 0200 0400 00000000 00000000 00000400 01000000")
    (tmp_path / "src.pcap").write_bytes(header + b"".join(records))
    subprocess.run(
        [editcap, "-F", "pcapng", tmp_path / "src.pcap", tmp_path / "x.pcapng"], check=True
    )
    subprocess.run([gzip_tool, "-k", tmp_path / "x.pcapng"], check=True)
    packed = (tmp_path / "x.pcapng.gz").read_bytes()
    assert sniff(packed[:4]) == "gzip"
    decoder = GzipDecoder()
    plain = decoder.feed(packed[:50]) + decoder.feed(packed[50:])
    decoder.close()
    assert sniff(plain[:4]) == "pcapng"
    parser = PcapngStreamParser()
    [(_, batch)] = parser.feed(plain)
    parser.close()
    assert [rec for _, rec in batch] == records


def drain(decoder: GzipDecoder, data: bytes) -> list[bytes]:
    """Everything `data` gives, as the pieces feed() returned (the rest fed b"")."""
    pieces = [decoder.feed(data)]
    while decoder.more:
        pieces.append(decoder.feed(b""))
    return pieces


def test_max_output_bounds_each_feed_of_a_member_that_expands_a_thousandfold() -> None:
    bomb = gzip.compress(bytes(10_000_000))  # about 10 KB in
    assert len(bomb) < 20_000
    decoder = GzipDecoder(max_output=65536)
    pieces = drain(decoder, bomb)
    decoder.close()
    assert max(len(p) for p in pieces) == 65536
    assert sum(len(p) for p in pieces) == 10_000_000
    assert len(pieces) >= 10_000_000 // 65536


def test_closing_with_output_held_back_is_a_mistake_of_the_caller() -> None:
    decoder = GzipDecoder(max_output=10)
    decoder.feed(gzip.compress(b"x" * 100))
    assert decoder.more
    with pytest.raises(ValueError, match="feed"):
        decoder.close()


@settings(deadline=None, max_examples=200)
@given(
    st.lists(st.binary(max_size=300), min_size=1, max_size=4),
    st.lists(st.integers(0, 2000), max_size=8),
    st.integers(1, 400),
)
def test_any_split_and_any_bound_give_the_same_bytes(
    parts: list[bytes], cuts: list[int], max_output: int
) -> None:
    stream = b"".join(gzip.compress(p * 3) for p in parts) + bytes(cuts[0] % 5 if cuts else 0)
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    decoder = GzipDecoder(max_output=max_output)
    pieces = [piece for a, b in itertools.pairwise(bounds) for piece in drain(decoder, stream[a:b])]
    decoder.close()
    assert all(len(piece) <= max_output for piece in pieces)
    assert b"".join(pieces) == b"".join(p * 3 for p in parts)
