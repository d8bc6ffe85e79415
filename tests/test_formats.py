"""ddump.formats: which capture format a file holds, and what it is when it is none."""

from __future__ import annotations

import pytest

from ddump.errors import PcapFormatError
from ddump.formats import sniff


@pytest.mark.parametrize(
    ("first", "kind"),
    [
        (bytes.fromhex("d4c3b2a1"), "pcap"),  # µs, little-endian
        (bytes.fromhex("a1b2c3d4"), "pcap"),  # µs, big-endian
        (bytes.fromhex("4d3cb2a1"), "pcap"),  # ns, little-endian
        (bytes.fromhex("a1b23c4d"), "pcap"),  # ns, big-endian
        (bytes.fromhex("0a0d0d0a"), "pcapng"),
        (bytes.fromhex("1f8b0800"), "gzip"),
    ],
)
def test_sniff_tells_the_formats_ddump_reads(first: bytes, kind: str) -> None:
    assert sniff(first) == kind


@pytest.mark.parametrize(
    ("first", "said"),
    [
        (b"<!DOCTYPE html><html>", "got HTML/text"),
        (b"BZh91AY&SY", "bzip2-compressed data: decompress it first"),
        (bytes.fromhex("fd377a585a00"), "xz-compressed"),
        (bytes.fromhex("28b52ffd"), "zstd-compressed"),
        (bytes.fromhex("34cdb2a1"), "Kuznetzov's modified pcap"),
        (bytes.fromhex("00010203"), "unknown binary data: 00 01 02 03"),
        (b"", "only 0 bytes"),
    ],
)
def test_sniff_names_what_it_refuses(first: bytes, said: str) -> None:
    with pytest.raises(PcapFormatError, match="not a") as caught:
        sniff(first)
    assert said in str(caught.value)
