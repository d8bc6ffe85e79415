"""pcapng blocks as read: block types, byte orders, and what an IDB's options say (no I/O).

The layouts of draft-ietf-opsawg-pcapng for the reader (ddump/pcapng_read.py); the writer
(ddump/pcapng.py) has its own, little-endian only.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from ddump.errors import PcapFormatError

BLOCK_SHB: Final = 0x0A0D0D0A  # a palindrome: the same in both byte orders
BLOCK_IDB: Final = 0x00000001
BLOCK_PB: Final = 0x00000002  # obsolete Packet Block
BLOCK_SPB: Final = 0x00000003
BLOCK_EPB: Final = 0x00000006
BYTE_ORDER_MAGIC: Final = 0x1A2B3C4D
BYTE_ORDER_SWAPPED: Final = 0x4D3C2B1A

IF_NAME: Final = 2
IF_DESCRIPTION: Final = 3
IF_TSRESOL: Final = 9
IF_TSOFFSET: Final = 14

# Wireshark's largest block (pcapng.c MAX_BLOCK_SIZE): a longer length is a corrupt file, not
# a reason to buffer gigabytes.
MAX_BLOCK: Final = 28 + 128 * 1024 * 1024 + 131072
MIN_TOTAL: Final = {BLOCK_SHB: 28, BLOCK_IDB: 20, BLOCK_PB: 32, BLOCK_SPB: 16, BLOCK_EPB: 32}
_BLOCK_NAMES: Final = {
    BLOCK_SHB: "Section Header Block",
    BLOCK_IDB: "Interface Description Block",
    BLOCK_PB: "Packet Block",
    BLOCK_SPB: "Simple Packet Block",
    BLOCK_EPB: "Enhanced Packet Block",
}
NS: Final = 1_000_000_000


class ByteOrder:
    """The structs for one byte order."""

    def __init__(self, prefix: str) -> None:
        self.big_endian = prefix == ">"
        self.head = struct.Struct(prefix + "II")  # type, total length
        self.u32 = struct.Struct(prefix + "I")
        self.epb = struct.Struct(prefix + "7I")  # type total ifid ts_high ts_low caplen origlen
        self.pb = struct.Struct(prefix + "IIHHIIII")  # ... ifid drops ts_high ts_low caplen len
        self.shb = struct.Struct(prefix + "IIIHH")  # type total magic major minor
        self.idb = struct.Struct(prefix + "HHI")  # linktype reserved snaplen
        self.opt = struct.Struct(prefix + "HH")  # code, length
        self.i64 = struct.Struct(prefix + "q")


LITTLE: Final = ByteOrder("<")
BIG: Final = ByteOrder(">")


@dataclass(frozen=True)
class Clock:
    """ns = (units * mul >> shift) // div + offset: exact, rounding down below 1 ns."""

    mul: int = 1000
    shift: int = 0
    div: int = 1
    offset: int = 0

    @property
    def simple(self) -> bool:
        """True if ns = units * mul + offset."""
        return self.shift == 0 and self.div == 1

    @classmethod
    def from_options(cls, tsresol: bytes | None, tsoffset: int) -> Clock:
        """The clock of if_tsresol (absent: µs) and if_tsoffset (whole seconds)."""
        offset = tsoffset * NS
        if not tsresol:
            return cls(offset=offset)
        exponent = tsresol[0] & 0x7F
        if tsresol[0] & 0x80:  # 2^-exponent s
            return cls(NS, exponent, 1, offset)
        if exponent <= 9:
            return cls(10 ** (9 - exponent), 0, 1, offset)
        return cls(1, 0, 10 ** (exponent - 9), offset)


def read_options(buf: bytes, pos: int, end: int, order: ByteOrder, where: str) -> dict[int, bytes]:
    """The options from pos to end (the block's trailer): code -> value, the first of each."""
    found: dict[int, bytes] = {}
    while end - pos >= 4:
        code, length = order.opt.unpack_from(buf, pos)
        if code == 0:  # opt_endofopt
            break
        start = pos + 4
        if length > end - start:
            raise PcapFormatError(
                f"pcapng {where}: option {code} is {length} bytes long, past the end of "
                "its block: the file is corrupt"
            )
        found.setdefault(code, buf[start : start + length])
        pos = start + ((length + 3) & ~3)
    return found


def option_text(value: bytes | None) -> str | None:
    """A string option: UTF-8, maybe NUL-terminated by older writers; bad bytes become U+FFFD."""
    if value is None:
        return None
    return value.rstrip(b"\0").decode("utf-8", errors="replace")


def block_name(kind: int) -> str:
    """ "Enhanced Packet Block", or "block of type 0x00000bad"."""
    return _BLOCK_NAMES.get(kind, f"block of type 0x{kind:08x}")


def check_length(kind: int, total: int, where: str) -> None:
    """PcapFormatError if a block of type `kind` cannot be `total` bytes long."""
    minimum = MIN_TOTAL.get(kind, 12)
    if total < minimum:
        fault = f"shorter than the {minimum} bytes such a block needs"
    elif total & 3:
        fault = "not a multiple of 4"
    elif total > MAX_BLOCK:
        fault = f"larger than the {MAX_BLOCK} bytes Wireshark accepts"
    else:
        return
    raise PcapFormatError(f"pcapng {where}: total length {total} is {fault}: the file is corrupt")


def section_order(buf: bytes, pos: int, base: int) -> ByteOrder:
    """The byte order of the section whose SHB is at buf[pos] (stream offset base + pos)."""
    magic = LITTLE.u32.unpack_from(buf, pos + 8)[0]
    if magic == BYTE_ORDER_MAGIC:
        return LITTLE
    if magic == BYTE_ORDER_SWAPPED:
        return BIG
    raise PcapFormatError(
        f"pcapng Section Header Block at byte {base + pos}: byte-order magic "
        f"{buf[pos + 8 : pos + 12].hex()} is neither 1a2b3c4d nor 4d3c2b1a: "
        "the file is corrupt or not pcapng"
    )
