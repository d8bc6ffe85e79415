"""Which capture format a file holds, from its first bytes (no I/O).

ddump reads classic pcap (ddump/pcap.py), pcapng (ddump/pcapng_read.py) and either of them
gzip-compressed (ddump/compressed.py). Anything else is refused with what it looks like, and
for other compressions, what to run first.
"""

from __future__ import annotations

from typing import Final

from ddump.errors import PcapFormatError
from ddump.pcap import describe_bytes

GZIP_MAGIC: Final = b"\x1f\x8b"
PCAPNG_MAGIC: Final = bytes.fromhex("0a0d0d0a")  # the SHB's type: the same in both byte orders
PCAP_MAGICS: Final = tuple(
    m.to_bytes(4, order) for m in (0xA1B2C3D4, 0xA1B23C4D) for order in ("little", "big")
)
_OTHER_FORMATS: Final = {  # magic -> what to say
    b"BZh": "bzip2-compressed data: decompress it first (bunzip2)",
    b"\xfd7zXZ": "xz-compressed data: decompress it first (unxz)",
    b"\x28\xb5\x2f\xfd": "zstd-compressed data: decompress it first (unzstd)",
    b"PK\x03\x04": "a zip archive: extract the capture first",
}


def sniff(first_bytes: bytes) -> str:
    """The format of a file starting with `first_bytes`: "pcap", "pcapng" or "gzip".

    Four bytes suffice. Anything else raises PcapFormatError saying what the bytes look like.
    """
    if first_bytes.startswith(GZIP_MAGIC):
        return "gzip"
    head = first_bytes[:4]
    if head == PCAPNG_MAGIC:
        return "pcapng"
    if head in PCAP_MAGICS:
        return "pcap"
    for magic, what in _OTHER_FORMATS.items():
        if first_bytes.startswith(magic):
            raise PcapFormatError(f"not a capture file: got {what}")
    if len(first_bytes) < 4:
        raise PcapFormatError(
            f"not a capture file: only {len(first_bytes)} bytes, too short for any capture format"
        )
    raise PcapFormatError(f"not a pcap, pcapng or gzip file: {describe_bytes(first_bytes)}")


def describe(data: bytes) -> str:
    """What bytes that are not the format expected look like ("got classic pcap", ...)."""
    if data[:4] in PCAP_MAGICS:
        return "got classic pcap"
    if data.startswith(GZIP_MAGIC):
        return "got gzip-compressed data"
    return describe_bytes(data)
