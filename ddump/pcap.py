"""Classic pcap: global header, an incremental record parser, link-type conversions (no I/O).

ddump always writes little-endian nanosecond pcap, which is lossless for every input, so records
leave this module with their 16-byte record header already in that encoding.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ddump import records as batches
from ddump.errors import PcapFormatError
from ddump.records import RECORD_HEADER_LEN as RECORD_HEADER_LEN
from ddump.records import Record as Record
from ddump.records import Records

MAGIC_MICRO: Final = 0xA1B2C3D4
MAGIC_NANO: Final = 0xA1B23C4D
LINKTYPE_ETHERNET: Final = 1
LINKTYPE_LINUX_SLL: Final = 113
LINKTYPE_LINUX_SLL2: Final = 276
GLOBAL_HEADER_LEN: Final = 24
DEFAULT_SNAPLEN: Final = 262144

_PCAPNG_MAGIC: Final = 0x0A0D0D0A  # Section Header Block type; a palindrome, same in both orders
_MODIFIED_MAGIC: Final = 0xA1B2CD34  # Kuznetzov's patched libpcap: longer record headers

# magic as read little-endian -> (big_endian, nano)
_MAGICS: Final = {
    MAGIC_MICRO: (False, False),
    MAGIC_NANO: (False, True),
    0xD4C3B2A1: (True, False),
    0x4D3CB2A1: (True, True),
}
_MAGIC_PREFIXES: Final = tuple(m.to_bytes(4, "little") for m in _MAGICS)

_U32LE: Final = struct.Struct("<I")
_GLOBAL_LE: Final = struct.Struct("<IHHiIII")
_GLOBAL_BE: Final = struct.Struct(">IHHiIII")
_REC_LE: Final = struct.Struct("<IIII")
_REC_BE: Final = struct.Struct(">IIII")


@dataclass(frozen=True)
class PcapHeader:
    """The 24-byte pcap global header."""

    linktype: int
    snaplen: int = DEFAULT_SNAPLEN
    nano: bool = True
    big_endian: bool = False
    version_major: int = 2
    version_minor: int = 4

    def to_bytes(self) -> bytes:
        """Encode in this header's own byte order and precision (thiszone and sigfigs are 0)."""
        layout = _GLOBAL_BE if self.big_endian else _GLOBAL_LE
        magic = MAGIC_NANO if self.nano else MAGIC_MICRO
        return layout.pack(
            magic, self.version_major, self.version_minor, 0, 0, self.snaplen, self.linktype
        )

    @classmethod
    def parse(cls, data: bytes) -> PcapHeader:
        """Decode the first 24 bytes of `data`; PcapFormatError names what they are instead."""
        _check_magic(data)
        if len(data) < GLOBAL_HEADER_LEN:
            raise PcapFormatError(
                f"pcap global header is {GLOBAL_HEADER_LEN} bytes, got only {len(data)}"
            )
        big_endian, nano = _MAGICS[_U32LE.unpack_from(data)[0]]
        layout = _GLOBAL_BE if big_endian else _GLOBAL_LE
        _, major, minor, _, _, snaplen, linktype = layout.unpack_from(data)
        if major != 2:
            raise PcapFormatError(f"unsupported pcap version {major}.{minor} (expected 2.x)")
        return cls(linktype, snaplen, nano, big_endian, major, minor)


def _check_magic(data: bytes) -> None:
    """Raise a PcapFormatError that says what `data` looks like if it cannot start a pcap."""
    if len(data) >= 4 and data[:4] in _MAGIC_PREFIXES:
        return
    if len(data) < 4 and any(p.startswith(data) for p in _MAGIC_PREFIXES):
        return
    raise PcapFormatError(f"not a pcap stream: {describe_bytes(data)}")


def describe_bytes(data: bytes) -> str:
    """Say what a body that is not pcap looks like, with a short printable preview."""
    if len(data) >= 4:
        magic = _U32LE.unpack_from(data)[0]
        if magic == _PCAPNG_MAGIC:
            return (
                "got pcapng (magic 0a0d0d0a), but ddump reads classic pcap: "
                "capture with tcpdump -w, which writes pcap"
            )
        if _MODIFIED_MAGIC in (magic, int.from_bytes(data[:4], "big")):
            return "got Kuznetzov's modified pcap (magic a1b2cd34), which ddump does not read"
    text = data[:512].decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    # U+FFFD (what undecodable bytes became) counts as printable to Python, not to us.
    printable = sum((c.isprintable() and c != "\ufffd") or c in "\t\r\n" for c in text)
    if not text or printable < 0.9 * len(text):
        return f"got {len(data)} bytes of unknown binary data: {data[:16].hex(' ')}"
    if text.startswith("<"):
        kind = "HTML/text"
    elif text.startswith(("{", "[")):
        kind = "JSON"
    elif text.startswith("HTTP/"):
        kind = "an HTTP response inside the body"
    else:
        kind = "text"
    preview = re.sub(r"\s+", " ", re.sub(r">\s+<", "><", text)).strip()
    return f"got {kind}: {preview[:60]!r}"


class PcapStreamParser:
    """Turns a pcap byte stream, fed in arbitrary chunks, into LE-nano records."""

    def __init__(self) -> None:
        self.header: PcapHeader | None = None
        self.records = 0
        self.bytes_in = 0
        # Unparsed bytes are kept as a list of chunks and joined only once enough have arrived
        # for the next record, so a large record fed in small pieces stays O(n), not O(n^2).
        self._chunks: list[bytes] = []
        self._pending = 0
        self._need = GLOBAL_HEADER_LEN
        self._limit = DEFAULT_SNAPLEN  # a longer caplen: not pcap, or corrupt
        self._keep = DEFAULT_SNAPLEN  # a longer caplen (up to _limit): truncated to this
        self.truncated = 0  # records longer than _keep, truncated
        self._fast = True
        self._rec: struct.Struct = _REC_LE
        self._scale = 1

    def feed(self, data: bytes) -> Records:
        """Parse what `data` completes; keep any partial tail for the next call."""
        size = len(data)
        if not size:
            return []
        if type(data) is not bytes:
            data = bytes(data)
        self.bytes_in += size
        pending = self._pending + size
        if pending < self._need:
            self._chunks.append(data)
            self._pending = pending
            if self.header is None:
                _check_magic(b"".join(self._chunks))
            return []
        out: list[Records] = []
        pos = 0
        # The header or record that straddles two chunks is completed from just the bytes it
        # lacks (twice at most: its record header tells how long the rest is); the rest of the
        # chunk is parsed where it lies. Joining the tail with the whole chunk would copy every
        # byte once more: measured 4 % of the whole merge of 1 MiB file reads.
        while self._chunks:
            take = self._need - self._pending
            if take > size - pos:
                self._chunks.append(data[pos:])
                self._pending += size - pos
                return batches.concat(out)
            self._chunks.append(data[pos : pos + take])
            head = b"".join(self._chunks)
            pos += take
            self._chunks = []
            self._pending = 0
            if self.header is None:
                self._start(PcapHeader.parse(head))
                continue
            done, used = self._parse(head, 0, out)
            out.append(done)
            if used < len(head):  # only the record header was complete: now the rest
                self._chunks = [head]
                self._pending = len(head)
        if self.header is None:
            self._start(PcapHeader.parse(data))
            pos = GLOBAL_HEADER_LEN
        done, pos = self._parse(data, pos, out)
        if pos < size:
            self._chunks = [data[pos:]]
            self._pending = size - pos
        if out:
            out.append(done)
            return batches.concat(out)
        return done

    def _parse(self, buf: bytes, pos: int, before: list[Records]) -> tuple[Records, int]:
        """Parse the whole records of buf from pos; `before`: what this feed parsed already."""
        parts: list[Records] = []
        while True:
            scanned = None
            if not self._fast:
                big_endian = self._rec is _REC_BE
                scanned = batches.scan_converting(buf, pos, big_endian, self._scale, self._keep)
            if self._fast:
                done, pos, self._need, bad = batches.scan(buf, pos, self._keep)
            elif scanned is not None:
                done, pos, self._need, bad = scanned
            else:
                converted, pos, bad = self._parse_converting(buf, pos)
                done = batches.pack(converted)
            parts.append(done)
            self.records += len(done)
            if not bad:
                break
            if bad > self._limit:
                raise PcapFormatError(
                    f"record {self.records + 1}: caplen {bad} is larger than "
                    f"{self._limit} (the stream's snaplen or {DEFAULT_SNAPLEN}, whichever is "
                    "larger): the stream is corrupt or not pcap",
                    records=list(batches.concat([*before, *parts])),
                )
            end = pos + RECORD_HEADER_LEN + bad
            if end > len(buf):  # the long record is not all here yet
                self._need = RECORD_HEADER_LEN + bad
                break
            parts.append(self._truncated(buf, pos))
            self.records += 1
            self.truncated += 1
            pos = end
        return batches.concat(parts), pos

    def _truncated(self, buf: bytes, pos: int) -> Records:
        # What libpcap does reading such a record: keep the first `_keep` bytes, and the
        # original length, so that every reader takes the output (tcpdump refuses a caplen
        # over 262144, and over the snaplen of a pcapng interface).
        sec, frac, caplen, origlen = self._rec.unpack_from(buf, pos)
        nsec = frac * self._scale
        sec, nsec = sec + nsec // 1_000_000_000, nsec % 1_000_000_000
        start = pos + RECORD_HEADER_LEN
        header = _REC_LE.pack(sec & 0xFFFFFFFF, nsec, self._keep, max(origlen, caplen))
        return batches.pack(
            [(sec * 1_000_000_000 + nsec, header + buf[start : start + self._keep])]
        )

    def close(self) -> None:
        """Raise PcapFormatError if the stream ended inside the global header or a record."""
        if not self._pending:
            return
        if self.header is None:
            data = b"".join(self._chunks)
            _check_magic(data)
            raise PcapFormatError(
                f"stream ended inside the pcap global header: got {len(data)} of "
                f"{GLOBAL_HEADER_LEN} bytes"
            )
        missing = self._need - self._pending
        what = "record header" if self._need == RECORD_HEADER_LEN else "record"
        raise PcapFormatError(
            f"stream cut mid-record: record {self.records + 1} ends {missing} bytes short "
            f"(got {self._pending} of the {self._need}-byte {what})"
        )

    def _start(self, header: PcapHeader) -> None:
        self.header = header
        self._limit = max(header.snaplen, DEFAULT_SNAPLEN)
        self._keep = min(header.snaplen or DEFAULT_SNAPLEN, DEFAULT_SNAPLEN)
        self._fast = header.nano and not header.big_endian
        self._rec = _REC_BE if header.big_endian else _REC_LE
        self._scale = 1 if header.nano else 1000
        self._need = RECORD_HEADER_LEN

    def _parse_converting(self, buf: bytes, pos: int) -> tuple[list[Record], int, int]:
        # Big-endian or microsecond input: each record header is rewritten in the output
        # encoding. Returns (records, pos, the caplen over the limit or 0).
        out: list[Record] = []
        append = out.append
        unpack = self._rec.unpack_from
        pack = _REC_LE.pack
        scale = self._scale
        limit = self._keep
        end = len(buf)
        last = end - 16
        last_sec = -1
        base = 0
        while pos <= last:
            sec, frac, caplen, origlen = unpack(buf, pos)
            if caplen > limit:
                self._need = 16
                return out, pos, caplen
            start = pos + 16
            nxt = start + caplen
            if nxt > end:
                self._need = nxt - pos
                return out, pos, 0
            nsec = frac * scale
            if nsec >= 1_000_000_000:
                # A sloppy writer's micro field >= 10**6: carry into seconds so the output
                # header stays valid and agrees with the timestamp.
                sec += nsec // 1_000_000_000
                nsec %= 1_000_000_000
            if sec != last_sec:
                last_sec = sec
                base = sec * 1_000_000_000
            append((base + nsec, pack(sec & 0xFFFFFFFF, nsec, caplen, origlen) + buf[start:nxt]))
            pos = nxt
        self._need = 16
        return out, pos, 0


def encode_records(records: Records) -> bytes:
    """The records' bytes, back to back (prefix a PcapHeader for a file)."""
    return batches.join(records)


# Both cooked headers are big-endian on the wire (https://www.tcpdump.org/linktypes/).
_SLL: Final = struct.Struct(">HHH8sH")  # pkttype hatype halen addr protocol
_SLL2: Final = struct.Struct(">HHIHBB8s")  # protocol reserved ifindex hatype pkttype halen addr


def _sll_to_sll2(link: bytes) -> bytes:
    pkttype, hatype, halen, addr, protocol = _SLL.unpack(link)
    return _SLL2.pack(protocol, 0, 0, hatype, min(pkttype, 255), min(halen, 255), addr)


def _sll2_to_sll(link: bytes) -> bytes:
    protocol, _, _, hatype, pkttype, halen, addr = _SLL2.unpack(link)
    return _SLL.pack(pkttype, hatype, halen, addr, protocol)


_Converter = Callable[[bytes], bytes]
_CONVERSIONS: Final[dict[tuple[int, int], tuple[int, _Converter]]] = {
    (LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2): (_SLL.size, _sll_to_sll2),
    (LINKTYPE_LINUX_SLL2, LINKTYPE_LINUX_SLL): (_SLL2.size, _sll2_to_sll),
}


def output_linktype(inputs: list[int]) -> int:
    """The link type of one pcap holding records of all `inputs` (non-empty, in target order).

    SLL2 is a superset of SLL (it adds the interface index), so a mixed fleet becomes SLL2
    without losing anything; otherwise the first input decides and the others must convert.
    """
    if LINKTYPE_LINUX_SLL2 in inputs and LINKTYPE_LINUX_SLL in inputs:
        return LINKTYPE_LINUX_SLL2
    return inputs[0]


def can_convert(src_linktype: int, dst_linktype: int) -> bool:
    """True if records of `src_linktype` can be written into a `dst_linktype` pcap."""
    return src_linktype == dst_linktype or (src_linktype, dst_linktype) in _CONVERSIONS


def convert_records(records: Records, src_linktype: int, dst_linktype: int) -> Records:
    """Rewrite each record's link header; SLL2 -> SLL drops the interface index.

    A link header cut short by the snapshot length is read as zero-padded, converted, and cut
    again at the same point, so caplen stays <= orig_len and nothing crashes.
    """
    if src_linktype == dst_linktype:
        return records
    if (src_linktype, dst_linktype) not in _CONVERSIONS:
        raise PcapFormatError(
            f"cannot convert link type {linktype_name(src_linktype)} "
            f"to {linktype_name(dst_linktype)}"
        )
    src_len, convert = _CONVERSIONS[(src_linktype, dst_linktype)]
    return batches.pack([_convert_one(rec, src_len, convert) for rec in records])


def _convert_one(rec: Record, src_len: int, convert: _Converter) -> Record:
    ts, data = rec
    sec, nsec, _, origlen = _REC_LE.unpack_from(data)
    link = data[RECORD_HEADER_LEN : RECORD_HEADER_LEN + src_len]
    new_link = convert(link.ljust(src_len, b"\0"))
    payload = data[RECORD_HEADER_LEN + src_len :]
    delta = len(new_link) - src_len
    if len(link) < src_len:
        new_link = new_link[: max(0, len(link) + delta)]
    data = new_link + payload
    new_origlen = max(origlen + delta, len(data))
    # SLL -> SLL2 adds 4 bytes: a record already at the largest snapshot length is cut back to
    # it, as readers refuse longer ones (orig_len still tells the whole size).
    data = data[:DEFAULT_SNAPLEN]
    return ts, _REC_LE.pack(sec, nsec, len(data), new_origlen) + data


_LINKTYPE_NAMES: Final = {
    0: "NULL",
    1: "ETHERNET",
    101: "RAW",
    105: "IEEE802_11",
    108: "LOOP",
    113: "LINUX_SLL",
    127: "IEEE802_11_RADIOTAP",
    228: "IPV4",
    229: "IPV6",
    276: "LINUX_SLL2",
}


def linktype_name(linktype: int) -> str:
    """A readable link type: "LINUX_SLL2 (276)", or "unknown (1234)"."""
    return f"{_LINKTYPE_NAMES.get(linktype, 'unknown')} ({linktype})"
