"""pcapng input: an incremental block parser that yields ddump's records per interface (no I/O).

A pcapng file (draft-ietf-opsawg-pcapng) is a sequence of blocks, `type u32, total length u32,
body, total length u32`, in the byte order of the Section Header Block (SHB) that starts its
section. Each section describes its interfaces in Interface Description Blocks (IDB), numbered
from 0 in the order they appear; packets say which one they came through. A new SHB starts a
new section, with its own byte order and no interface.

What this parser turns into records: Enhanced Packet Blocks (EPB), Simple Packet Blocks (SPB)
and the obsolete Packet Blocks (PB) of old Wireshark versions. Every other block (name
resolution, interface statistics, decryption secrets, custom and unknown types) is skipped by
its length, after the same length checks. Records leave in ddump's one internal form, a 16-byte
little-endian nanosecond pcap record header then the data (ddump/records.py), in runs of
consecutive packets of one interface, in file order.

Timestamps are integer nanoseconds, never floats. if_tsresol gives the unit: 10^-k s (the
default is microseconds, k = 6) or 2^-k s; a unit finer than a nanosecond (10^-10 s, 2^-30 s,
...) is rounded down to the nanosecond, the only precision ddump keeps. if_tsoffset (whole
seconds) is added. A timestamp before 1970 or at 2^63 ns (year 2262) or later cannot be an
integer ns timestamp of ours and is refused; from 2^32 s (year 2106) on, the 32-bit seconds of
the record header wrap, as in ddump/pcap.py, while the record's own timestamp stays exact.

An SPB has no timestamp. mergecap writes it out as soon as it reads it, so in place (its
file's previous packet has just been written), but with the time 0 (1970), which makes its
output go back in time. Here it takes the timestamp of the stream's previous packet (0 if it is
the first), which puts it in the same place in a merge and keeps the output in order.

A packet longer than its interface's snapshot length, or than 262144 bytes (what tcpdump and
ddump's pcap output accept), is cut to that length, keeping its original length; such cuts are
counted in `truncated`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from ddump import records as batches
from ddump.errors import PcapFormatError
from ddump.formats import PCAPNG_MAGIC, describe
from ddump.formats import sniff as sniff
from ddump.pcap import DEFAULT_SNAPLEN
from ddump.pcapng_blocks import (
    BLOCK_EPB,
    BLOCK_IDB,
    BLOCK_PB,
    BLOCK_SHB,
    BLOCK_SPB,
    IF_DESCRIPTION,
    IF_NAME,
    IF_TSOFFSET,
    IF_TSRESOL,
    LITTLE,
    NS,
    Clock,
    block_name,
    check_length,
    option_text,
    read_options,
    section_order,
)
from ddump.records import Record, Records

_HEAD_LEN: Final = 12  # type, total length, and (in an SHB) the byte-order magic
_MAX_NS: Final = 1 << 63
_LOW32: Final = 0xFFFFFFFF
_REC: Final = struct.Struct("<IIII")  # ddump's record header: sec, nsec, caplen, orig_len


@dataclass(frozen=True)
class InputInterface:
    """One IDB as read; `snaplen` is the length records of it are cut to (at most 262144)."""

    linktype: int
    snaplen: int
    name: str | None  # if_name
    description: str | None  # if_description
    section: int  # 0 for the first SHB, 1 for the next, ...
    id: int  # interface id within its section


class PcapngFormatError(PcapFormatError):
    """A pcapng stream that cannot be read on; `runs` holds the good runs parsed before."""

    def __init__(
        self, message: str, runs: list[tuple[InputInterface, Records]] | None = None
    ) -> None:
        super().__init__(message)
        self.runs = runs if runs is not None else []


class PcapngStreamParser:
    """Turns a pcapng byte stream, fed in arbitrary chunks, into runs of records.

    After a PcapFormatError (a PcapngFormatError carrying the good runs before it) the parser
    must not be fed again.
    """

    def __init__(self) -> None:
        self.records = 0  # packets returned so far
        self.truncated = 0  # packets cut to their interface's snaplen or to 262144 bytes
        self.bytes_in = 0
        self.section = -1  # no SHB seen yet
        self.interfaces: list[InputInterface] = []  # the current section's
        self._order = LITTLE
        self._clocks: list[Clock] = []
        self._fast: list[tuple[int, int, int] | None] = []  # (mul, offset, limit) if plain
        self._snaplens: list[int] = []  # as the IDBs say (0: no limit)
        # Unparsed bytes: a list of chunks joined only when the block they start is complete.
        self._tail: list[bytes] = []
        self._pending = 0
        self._need = _HEAD_LEN
        self._offset = 0  # stream offset of the first unparsed byte
        self._out: list[tuple[InputInterface, Records]] = []
        self._parts: list[Records] = []  # the run being built: batches, then ...
        self._run: list[Record] = []  # ... records parsed one by one, after them
        self._run_id = -1  # interface of the run being built; -1: none
        self._last_ns = 0

    def feed(self, data: bytes) -> list[tuple[InputInterface, Records]]:
        """Parse what `data` completes; keep any partial block for the next call.

        A run of one interface may be cut where a feed ends: the next feed goes on with it.
        """
        if not data:
            return []
        if type(data) is not bytes:
            data = bytes(data)
        self.bytes_in += len(data)
        self._out = []
        try:
            self._feed(data)
        except PcapFormatError as error:
            self._flush_run()
            raise PcapngFormatError(str(error), self._out) from None
        self._flush_run()
        out, self._out = self._out, []
        return out

    def _feed(self, data: bytes) -> None:
        size = len(data)
        pos = 0
        # The block that straddles two chunks is completed from just the bytes it lacks (twice
        # at most: its first 12 bytes tell its length); the rest of the chunk is parsed where it
        # lies, as in PcapStreamParser.
        while self._tail:
            take = self._need - self._pending
            if take > size - pos:
                self._tail.append(data[pos:])
                self._pending += size - pos
                return
            self._tail.append(data[pos : pos + take])
            pos += take
            head = b"".join(self._tail)
            self._tail = []
            self._pending = 0
            used = self._parse(head, 0, self._offset)
            self._offset += used
            if used < len(head):  # only its first 12 bytes were complete: now the rest
                self._tail = [head[used:]]
                self._pending = len(head) - used
        used = self._parse(data, pos, self._offset - pos)
        self._offset += used - pos
        if used < size:
            self._tail = [data[used:]]
            self._pending = size - used

    def close(self) -> None:
        """Raise PcapFormatError if the stream ended inside a block."""
        if not self._pending:
            return
        data = b"".join(self._tail)
        if self.section < 0 and not data.startswith(PCAPNG_MAGIC[: len(data)]):
            _refuse_stream(data)
        raise PcapngFormatError(
            f"pcapng stream cut mid-block: the block at byte {self._offset} ends "
            f"{self._need - self._pending} bytes short (got {self._pending} of "
            f"{'its first ' if self._need == _HEAD_LEN else ''}{self._need} bytes): "
            "the file is truncated"
        )

    # ---- blocks ----

    def _parse(self, buf: bytes, pos: int, base: int) -> int:
        """Parse the whole blocks of buf from pos (buf[0] is at stream offset `base`).

        Returns where parsing stopped and sets self._need to what the block there needs.
        """
        end = len(buf)
        while True:
            if self._fast:
                pos = self._epbs(buf, pos, end)
            if end - pos < _HEAD_LEN:
                self._need = _HEAD_LEN
                return pos
            kind, total = self._order.head.unpack_from(buf, pos)
            if kind == BLOCK_SHB:
                self._order = section_order(buf, pos, base)
                kind, total = self._order.head.unpack_from(buf, pos)
            elif self.section < 0:
                _refuse_stream(buf[pos:])
            where = f"{block_name(kind)} at byte {base + pos}"
            check_length(kind, total, where)
            if total > end - pos:
                self._need = total
                return pos
            trailer = self._order.u32.unpack_from(buf, pos + total - 4)[0]
            if trailer != total:
                raise PcapngFormatError(
                    f"pcapng {where}: total length {total} at its start but {trailer} at its "
                    "end: the file is corrupt"
                )
            if kind == BLOCK_EPB:
                self._epb(buf, pos, total, where)
            elif kind == BLOCK_SPB:
                self._spb(buf, pos, total, where)
            elif kind == BLOCK_PB:
                self._pb(buf, pos, total, where)
            elif kind == BLOCK_IDB:
                self._idb(buf, pos, total, where)
            elif kind == BLOCK_SHB:
                self._shb(buf, pos, where)
            pos += total

    def _epbs(self, buf: bytes, pos: int, end: int) -> int:
        """The hot loop: EPBs of interfaces with a plain clock, as long as nothing is unusual.

        Anything else (another block, a cut, a bad length, a timestamp out of range, the end of
        the buffer) stops it; `_parse` then handles that block in full.
        """
        fast = self._fast
        scanned = batches.scan_epbs(buf, pos, self._order.big_endian, fast)
        if scanned is not None:
            batch, runs, pos = scanned
            if len(runs) == 2:
                self._add(runs[0], batch)
            elif runs:
                self._add_runs(batch, runs)
            return pos
        run_id = -1  # the interface whose clock is in mul, offset, limit
        mul = offset = limit = 0
        run = self._run
        append = run.append
        unpack = self._order.epb.unpack_from
        trailer = self._order.u32.unpack_from
        pack = _REC.pack
        last = end - 28
        while pos <= last:
            kind, total, ifid, high, low, caplen, origlen = unpack(buf, pos)
            if kind != BLOCK_EPB:
                break
            if ifid != run_id:
                plain = fast[ifid] if ifid < len(fast) else None
                if plain is None:
                    break
                mul, offset, limit = plain
                run_id = ifid
                if ifid != self._run_id:
                    self._flush_run()
                    self._run_id = ifid
                    run = self._run
                    append = run.append
            nxt = pos + total
            if caplen > limit or nxt > end or total & 3 or caplen + 32 > total:
                break
            if trailer(buf, nxt - 4)[0] != total:
                break
            ns = (high << 32 | low) * mul + offset
            if not 0 <= ns < _MAX_NS:
                break
            sec, nsec = divmod(ns, NS)
            start = pos + 28
            append((ns, pack(sec & _LOW32, nsec, caplen, origlen) + buf[start : start + caplen]))
            pos = nxt
        return pos

    def _add_runs(self, batch: Records, runs: list[int]) -> None:
        # Interfaces that alternate packet by packet make a run per packet: the runs between
        # the first (which may go on with the current run) and the last (which may go on in
        # the next feed) go straight out, as slices of the batch.
        start = runs[1]
        self._add(runs[0], batch[:start])
        self._flush_run()
        interfaces = self.interfaces
        append = self._out.append
        for k in range(2, len(runs) - 2, 2):
            end = start + runs[k + 1]
            append((interfaces[runs[k]], batch[start:end]))
            start = end
        self.records += start - runs[1]
        self._run_id = runs[-2]
        self._parts.append(batch[start:])

    def _add(self, ifid: int, records: Records) -> None:
        """Records of interface `ifid` that follow the ones parsed so far."""
        if ifid != self._run_id:
            self._flush_run()
            self._run_id = ifid
        elif self._run:
            self._parts.append(batches.pack(self._run))
            self._run = []
        self._parts.append(records)

    def _epb(self, buf: bytes, pos: int, total: int, where: str) -> None:
        _, _, ifid, high, low, caplen, origlen = self._order.epb.unpack_from(buf, pos)
        if caplen > total - 32:
            raise PcapngFormatError(
                f"pcapng {where}: captured length {caplen} does not fit in its "
                f"{total}-byte block: the file is corrupt"
            )
        self._packet(ifid, high << 32 | low, buf, pos + 28, caplen, origlen, where)

    def _pb(self, buf: bytes, pos: int, total: int, where: str) -> None:
        _, _, ifid, _, high, low, caplen, origlen = self._order.pb.unpack_from(buf, pos)
        if caplen > total - 32:
            raise PcapngFormatError(
                f"pcapng {where}: captured length {caplen} does not fit in its "
                f"{total}-byte block: the file is corrupt"
            )
        self._packet(ifid, high << 32 | low, buf, pos + 28, caplen, origlen, where)

    def _spb(self, buf: bytes, pos: int, total: int, where: str) -> None:
        # The captured length is not in the block: the spec makes it the smaller of the
        # original length and the interface's snaplen; the padded block bounds it too.
        if not self.interfaces:
            raise PcapngFormatError(
                f"pcapng {where}: a packet of interface 0, but its section has no "
                "Interface Description Block before it: the file is corrupt"
            )
        origlen = self._order.u32.unpack_from(buf, pos + 8)[0]
        caplen = min(origlen, self._snaplens[0]) if self._snaplens[0] else origlen
        if caplen > total - 16:
            raise PcapngFormatError(
                f"pcapng {where}: a {caplen}-byte packet does not fit in its {total}-byte "
                "block: the file is corrupt"
            )
        if self._run:
            ns = self._run[-1][0]
        elif self._parts:
            ns = batches.last_ts(self._parts[-1])
        else:
            ns = self._last_ns
        self._emit(0, ns, buf, pos + 12, caplen, origlen)

    def _packet(
        self, ifid: int, units: int, buf: bytes, start: int, caplen: int, origlen: int, where: str
    ) -> None:
        if ifid >= len(self.interfaces):
            known = len(self.interfaces)
            raise PcapngFormatError(
                f"pcapng {where}: interface id {ifid}, but its section describes "
                + (f"only interfaces 0 to {known - 1}" if known else "no interface")
                + ": the file is corrupt"
            )
        clock = self._clocks[ifid]
        ns = (units * clock.mul >> clock.shift) // clock.div + clock.offset
        if not 0 <= ns < _MAX_NS:
            raise PcapngFormatError(
                f"pcapng {where}: timestamp {ns} ns since 1970 is out of the range ddump "
                "keeps (0 to 2^63 ns, the year 2262): the file is corrupt or its "
                "if_tsresol / if_tsoffset wrong"
            )
        self._emit(ifid, ns, buf, start, caplen, origlen)

    def _emit(self, ifid: int, ns: int, buf: bytes, start: int, caplen: int, origlen: int) -> None:
        limit = self.interfaces[ifid].snaplen
        if caplen > limit:
            caplen = limit
            self.truncated += 1
        if ifid != self._run_id:
            self._flush_run()
            self._run_id = ifid
        sec, nsec = divmod(ns, NS)
        header = _REC.pack(sec & _LOW32, nsec, caplen, origlen)
        self._run.append((ns, header + buf[start : start + caplen]))

    def _flush_run(self) -> None:
        if self._run:
            self._parts.append(batches.pack(self._run))
            self._run = []
        if self._parts:
            run = batches.concat(self._parts)
            self._parts = []
            self._out.append((self.interfaces[self._run_id], run))
            self.records += len(run)
            self._last_ns = batches.last_ts(run)

    def _shb(self, buf: bytes, pos: int, where: str) -> None:
        major, minor = self._order.shb.unpack_from(buf, pos)[3:]
        if major != 1:
            raise PcapngFormatError(
                f"pcapng {where}: version {major}.{minor}, and ddump reads version 1.x"
            )
        self._flush_run()
        self._run_id = -1
        self.section += 1
        self.interfaces = []
        self._clocks = []
        self._fast = []
        self._snaplens = []

    def _idb(self, buf: bytes, pos: int, total: int, where: str) -> None:
        linktype, _, snaplen = self._order.idb.unpack_from(buf, pos + 8)
        found = read_options(buf, pos + 16, pos + total - 4, self._order, where)
        tsoffset = found.get(IF_TSOFFSET)
        if tsoffset is not None and len(tsoffset) != 8:
            raise PcapngFormatError(
                f"pcapng {where}: if_tsoffset is {len(tsoffset)} bytes, not 8: the file is corrupt"
            )
        offset = self._order.i64.unpack(tsoffset)[0] if tsoffset else 0
        limit = min(snaplen, DEFAULT_SNAPLEN) if snaplen else DEFAULT_SNAPLEN
        interface = InputInterface(
            linktype,
            limit,
            option_text(found.get(IF_NAME)),
            option_text(found.get(IF_DESCRIPTION)),
            self.section,
            len(self.interfaces),
        )
        self.interfaces.append(interface)
        clock = Clock.from_options(found.get(IF_TSRESOL), offset)
        self._clocks.append(clock)
        plain = clock.simple and -_MAX_NS <= clock.offset < _MAX_NS and clock.mul < _MAX_NS
        self._fast.append((clock.mul, clock.offset, limit) if plain else None)
        self._snaplens.append(snaplen)


def _refuse_stream(data: bytes) -> None:
    raise PcapngFormatError(
        f"not a pcapng stream (no Section Header Block first): {describe(data)}"
    )
