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

    def __init__(self) -> None:
        self.bytes_in = 0
        self.bytes_out = 0
        self.members = 1  # gzip members started (the first starts with the stream)
        self._inflate: zlib._Decompress | None = zlib.decompressobj(_GZIP_WBITS)
        self._member_start = 0  # offset in the compressed stream of the current member
        self._held = b""  # the start of what follows a member, too short to tell what it is
        self._padding = False  # past the last member, in zero padding

    def feed(self, data: bytes) -> bytes:
        """The bytes `data` completes (maybe none); raises PcapFormatError on corrupt input."""
        offset = self.bytes_in - len(self._held)  # stream offset of the first byte to look at
        self.bytes_in += len(data)
        if self._held:
            data, self._held = self._held + data, b""
        out: list[bytes] = []
        while data:
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
                out.append(inflate.decompress(data))
            except zlib.error as error:
                raise PcapFormatError(
                    f"gzip member {self.members} (starting at byte {self._member_start}) is "
                    f"corrupt: {error}"
                ) from None
            if not inflate.eof:
                break
            rest = inflate.unused_data
            offset += len(data) - len(rest)
            data = rest
            self._inflate = None
        result = b"".join(out)
        self.bytes_out += len(result)
        return result

    def close(self) -> None:
        """Raise PcapFormatError if the stream ended inside a gzip member (a truncated file)."""
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
