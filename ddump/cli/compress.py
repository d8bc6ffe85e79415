"""Compressed output (`-w x.pcap.gz`, `x.pcap.zst`): which names compress, and the streams
(no I/O).

The stream is a series of gzip members, one ended at every flush (at least once a second) and
at the end of the file. Concatenated members are one valid gzip file (RFC 1952, 2.2) that
zlib, gzip, tshark, capinfos and mergecap read whole. A member, unlike a sync flush, ends with
its CRC and length: a file cut after any member (a full disk, truncated there) is a complete,
valid gzip file, and one cut inside a member (kill -9) reads back whole up to that member.
Starting a member every second costs 18 bytes and a fresh dictionary: nothing measurable.

zstd (`.zst`) works the same way with frames (RFC 8878, 3.1: a file is a series of frames),
through the `zstandard` module, an optional extra (`pip install 'ddump[zstd]'`): without it a
.zst name is refused before anything starts.
"""

from __future__ import annotations

import importlib.util
import zlib
from typing import TYPE_CHECKING, Final

from ddump.errors import UsageError

if TYPE_CHECKING:
    import zstandard

GZIP_LEVEL: Final = 1  # as `gzip -1`: a capture compresses ~2-4x at any level; speed matters
_GZIP_WBITS: Final = 16 + zlib.MAX_WBITS  # a gzip header and trailer around the deflate data
ZSTD_LEVEL: Final = 3  # zstd's own default: faster than gzip -1, and smaller
_SUFFIXES: Final = {".gz": "gzip", ".zst": "zstd"}


def compression_of(path: str) -> str | None:
    """'gzip' for a name ending in .gz, 'zstd' for .zst (any case), None for the others."""
    lowered = path.lower()
    for suffix, kind in _SUFFIXES.items():
        if lowered.endswith(suffix):
            return kind
    return None


def without_compression(path: str) -> str:
    """The name without its compression suffix: `x.pcapng.gz` -> `x.pcapng`."""
    if compression_of(path) is None:
        return path
    return path[: path.rindex(".")]


class GzipStream:
    """Bytes in, gzip members out: `compress()` as data comes, `end_member()` to flush."""

    def __init__(self, level: int = GZIP_LEVEL) -> None:
        self.level = level
        self._deflate = zlib.compressobj(level, zlib.DEFLATED, _GZIP_WBITS)
        self._open = False  # data went in since the last member ended

    def compress(self, data: bytes | memoryview) -> bytes:
        """What is ready of `data`'s compressed form (zlib keeps some back until a flush)."""
        if not data:
            return b""
        self._open = True
        return self._deflate.compress(data)

    def end_member(self) -> bytes:
        """The rest of the current member with its trailer; b"" when nothing is pending.

        Afterwards the bytes given out so far are a complete gzip file.
        """
        if not self._open:
            return b""
        tail = self._deflate.flush(zlib.Z_FINISH)
        self._deflate = zlib.compressobj(self.level, zlib.DEFLATED, _GZIP_WBITS)
        self._open = False
        return tail

    @property
    def pending(self) -> bool:
        """True when data went in that is not yet in a whole member."""
        return self._open


class ZstdStream:
    """Bytes in, zstd frames out, as GzipStream does with gzip members."""

    def __init__(self, level: int = ZSTD_LEVEL) -> None:
        import zstandard

        self._zstd = zstandard
        self._compressor = zstandard.ZstdCompressor(level=level)
        self._frame: zstandard.ZstdCompressionObj = self._compressor.compressobj()
        self._open = False

    def compress(self, data: bytes | memoryview) -> bytes:
        if not data:
            return b""
        self._open = True
        return self._frame.compress(bytes(data))

    def end_member(self) -> bytes:
        """The rest of the current frame; afterwards the output so far is a whole .zst file."""
        if not self._open:
            return b""
        tail = self._frame.flush(self._zstd.COMPRESSOBJ_FLUSH_FINISH)
        self._frame = self._compressor.compressobj()
        self._open = False
        return tail

    @property
    def pending(self) -> bool:
        return self._open


def check_available(path: str) -> None:
    """Refuse a .zst name when the optional zstandard module is missing (a usage error)."""
    if compression_of(path) == "zstd" and importlib.util.find_spec("zstandard") is None:
        raise UsageError(
            f"-w {path}: writing zstd needs the zstandard module (pip install "
            "'ddump[zstd]', or python3-zstandard): name the file .gz, or compress finished "
            "files with -z zstd"
        )


def stream_for(kind: str) -> GzipStream | ZstdStream:
    """A new compressed stream of this kind ('gzip' or 'zstd')."""
    return ZstdStream() if kind == "zstd" else GzipStream()
