"""gzip input: a streaming decompressor fed in arbitrary chunks (no I/O).

A `.pcap.gz` is one gzip member, or several back to back (`cat a.gz b.gz`, which gunzip and
mergecap read as the concatenation of their contents). After the last member, zero bytes (a
tape block's padding) are ignored, as gunzip does; anything else there is an error, not data.
"""

from __future__ import annotations

import zlib
from typing import Final

from ddump.errors import PcapFormatError

_GZIP_WBITS: Final = 31  # 16 + 15: a gzip header and trailer, the largest window
_MAGIC: Final = b"\x1f\x8b"


class GzipDecoder:
    """Turns gzip bytes, fed in arbitrary chunks, into the bytes they compress."""

    def __init__(self, max_output: int = 0) -> None:
        """`max_output` > 0 bounds what one feed returns (see `more`); 0: no bound."""
        self.bytes_in = 0
        self.bytes_out = 0
        self.members = 1  # gzip members started (the first starts with the stream)
        self.max_output = max_output
        # True when input is held back that gives more output: feed(b"") for it.
        self.more = False
        self._inflate: zlib._Decompress | None = zlib.decompressobj(_GZIP_WBITS)
        self._member_start = 0  # offset in the compressed stream of the current member
        # Input not decoded yet: what follows a member while too short to tell what it is, or
        # what zlib left over when the output reached max_output.
        self._held = b""
        self._padding = False  # past the last member, in zero padding

    def feed(self, data: bytes) -> bytes:
        """The bytes `data` completes (maybe none); raises PcapFormatError on corrupt input.

        With a `max_output`, at most that many: while `more` is true, feed(b"") gives the rest
        (a gzip member can expand 1000-fold: a bounded read must not become an unbounded
        allocation).
        """
        offset = self.bytes_in - len(self._held)  # stream offset of the first byte to look at
        self.bytes_in += len(data)
        if self._held:
            data, self._held = self._held + data, b""
        out: list[bytes] = []
        room = self.max_output
        drain = self.more  # zlib may hold output back even with all input taken
        self.more = False
        while data or drain:
            drain = False
            if self._padding:
                if data.strip(b"\0"):
                    self._garbage(offset + len(data) - len(data.lstrip(b"\0")))
                break
            if self._inflate is None:  # a member ended: another, or padding?
                if len(data) < len(_MAGIC) and _MAGIC.startswith(data):
                    self._held = data
                    break
                if data.startswith(_MAGIC):
                    self._inflate = zlib.decompressobj(_GZIP_WBITS)
                    self._member_start = offset
                    self.members += 1
                elif data[0] == 0:
                    self._padding = True
                    continue
                else:
                    self._garbage(offset)
            inflate = self._inflate
            assert inflate is not None
            try:
                piece = inflate.decompress(data, room)
            except zlib.error as error:
                raise PcapFormatError(
                    f"gzip member {self.members} (starting at byte {self._member_start}) is "
                    f"corrupt: {error}"
                ) from None
            out.append(piece)
            if self.max_output:
                room -= len(piece)
                if not room and not inflate.eof:
                    self._held = inflate.unconsumed_tail
                    self.more = True
                    break
            if not inflate.eof:
                break
            rest = inflate.unused_data
            offset += len(data) - len(rest)
            data = rest
            self._inflate = None
            if self.max_output and not room and data:
                self._held = data
                self.more = True
                break
        result = b"".join(out)
        self.bytes_out += len(result)
        return result

    def close(self) -> None:
        """Raise PcapFormatError if the stream ended inside a gzip member (a truncated file)."""
        if self.more:
            raise ValueError("GzipDecoder closed with output held back: feed(b'') while `more`")
        if self._inflate is not None:
            raise PcapFormatError(
                f"gzip stream cut short: member {self.members} (starting at byte "
                f"{self._member_start}) has no end after {self.bytes_in} bytes in, "
                f"{self.bytes_out} out: the file is truncated"
            )
        if self._held:
            self._garbage(self.bytes_in - len(self._held))

    def _garbage(self, offset: int) -> None:
        raise PcapFormatError(
            f"gzip stream: bytes at {offset} after the end of member {self.members} are "
            "neither another gzip member nor zero padding: the file is corrupt"
        )
