"""Capture streams in any format ddump reads: pcap, pcapng, either gzip-compressed (no I/O).

A file target may hold any of them (mergecap reads them all); what comes out is the same for
each: segments of records in ddump's own form (ddump/records.py), each with the link type and
snapshot length of the interface it was captured on. A pcap stream is one interface; a
pcapng stream may hold several, of different link types, over several sections.
"""

from __future__ import annotations

from dataclasses import dataclass

from ddump.compressed import GzipDecoder
from ddump.errors import PcapFormatError
from ddump.formats import sniff
from ddump.pcap import PcapStreamParser
from ddump.pcapng_read import InputInterface, PcapngFormatError, PcapngStreamParser
from ddump.records import Records

_SNIFF_LEN = 4  # enough for every magic sniff() knows
# What one feed of compressed input may inflate to: a 256 KiB read of zeros would otherwise
# give ~256 MB at once. The rest comes from feed(b"") while `more` is true.
MAX_INFLATE = 4 * 1024 * 1024


@dataclass(frozen=True)
class Segment:
    """Records of one interface, in stream order."""

    linktype: int
    snaplen: int
    records: Records
    interface: InputInterface | None = None  # a pcapng input's interface; None: pcap


class DecodeError(PcapFormatError):
    """The stream cannot be read on; `segments` holds the good records before the fault."""

    def __init__(self, message: str, segments: list[Segment]) -> None:
        super().__init__(message)
        self.segments = segments


class CaptureDecoder:
    """Turns a capture stream of any format ddump reads, fed in any chunks, into segments."""

    def __init__(self) -> None:
        self.format: str | None = None  # "pcap" or "pcapng", once known
        self.compressed = False
        self._head = b""  # the first bytes, until they tell the format
        self._gzip: GzipDecoder | None = None
        self._pcap: PcapStreamParser | None = None
        self._pcapng: PcapngStreamParser | None = None

    @property
    def started(self) -> bool:
        """The stream's header has come: a pcap global header, or a pcapng section."""
        if self._pcap is not None:
            return self._pcap.header is not None
        return self._pcapng is not None and self._pcapng.section >= 0

    @property
    def truncated(self) -> int:
        """Records longer than their snapshot length (or 262144 bytes), cut to it."""
        parser = self._pcap or self._pcapng
        return parser.truncated if parser is not None else 0

    @property
    def more(self) -> bool:
        """Compressed input is held that gives more: feed(b"") for it."""
        return self._gzip is not None and self._gzip.more

    @property
    def linktype(self) -> int | None:
        """The stream's link type (a pcapng stream's first interface's), once known."""
        first = self._first()
        return None if first is None else first[0]

    @property
    def snaplen(self) -> int | None:
        first = self._first()
        return None if first is None else first[1]

    def _first(self) -> tuple[int, int] | None:
        if self._pcap is not None and self._pcap.header is not None:
            return self._pcap.header.linktype, self._pcap.header.snaplen
        if self._pcapng is not None and self._pcapng.interfaces:
            iface = self._pcapng.interfaces[0]
            return iface.linktype, iface.snaplen
        return None

    def feed(self, data: bytes) -> list[Segment]:
        """The segments `data` completes; DecodeError (with the good ones) on a fault."""
        if self._gzip is not None:
            try:
                data = self._gzip.feed(data)
            except PcapFormatError as exc:
                raise DecodeError(f"gzip: {exc}", []) from None
        elif self.format is None:
            return self._sniff(data)
        return self._parse(data)

    def close(self) -> None:
        """PcapFormatError if the stream ended inside a header, a record or a block."""
        if self._gzip is not None:
            self._gzip.close()
        if self.format is None:
            if self._head:
                sniff(self._head)  # says what it is, or that it is too short
            raise PcapFormatError("the stream ended before a capture header")
        parser = self._pcap or self._pcapng
        assert parser is not None
        parser.close()

    def _sniff(self, data: bytes) -> list[Segment]:
        self._head += data
        if len(self._head) < _SNIFF_LEN:
            return []
        data, self._head = self._head, b""
        kind = sniff(data)
        if kind == "gzip" and self._gzip is None and not self.compressed:
            self.compressed = True
            self._gzip = GzipDecoder(max_output=MAX_INFLATE)
            return self.feed(data)
        if kind == "gzip":
            raise PcapFormatError("gzip-compressed twice: decompress it first")
        self.format = kind
        if kind == "pcap":
            self._pcap = PcapStreamParser()
        else:
            self._pcapng = PcapngStreamParser()
        return self._parse(data)

    def _parse(self, data: bytes) -> list[Segment]:
        if self.format is None:
            return self._sniff(data)
        if self._pcap is not None:
            return self._parse_pcap(self._pcap, data)
        assert self._pcapng is not None
        try:
            runs = self._pcapng.feed(data)
        except PcapngFormatError as exc:
            raise DecodeError(str(exc), [_segment(i, r) for i, r in exc.runs]) from None
        return [_segment(iface, records) for iface, records in runs]

    @staticmethod
    def _parse_pcap(parser: PcapStreamParser, data: bytes) -> list[Segment]:
        """A pcap parser's records as one segment (DecodeError with the good ones)."""
        try:
            records = parser.feed(data)
        except PcapFormatError as exc:
            header = parser.header
            good = exc.records if header is not None else []
            segments = [Segment(header.linktype, header.snaplen, good)] if good and header else []
            raise DecodeError(str(exc), segments) from None
        header = parser.header
        if not records or header is None:
            return []
        return [Segment(header.linktype, header.snaplen, records)]


def _segment(iface: InputInterface, records: Records) -> Segment:
    return Segment(iface.linktype, iface.snaplen, records, iface)


class PcapDecoder:
    """A live capture stream, which is classic pcap (a worker's, tcpdump's over SSH)."""

    more = False

    def __init__(self) -> None:
        self._parser = PcapStreamParser()

    @property
    def started(self) -> bool:
        return self._parser.header is not None

    @property
    def truncated(self) -> int:
        return self._parser.truncated

    @property
    def linktype(self) -> int | None:
        header = self._parser.header
        return None if header is None else header.linktype

    @property
    def snaplen(self) -> int | None:
        header = self._parser.header
        return None if header is None else header.snaplen

    def feed(self, data: bytes) -> list[Segment]:
        return CaptureDecoder._parse_pcap(self._parser, data)

    def close(self) -> None:
        self._parser.close()
