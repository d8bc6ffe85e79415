"""HTTP/1.1 chunked transfer coding, decoded from reads of any size (pure).

A live capture arrives as many small HTTP chunks; decoding them from whole socket reads hands
the session every payload byte of a read in one call, instead of three reads (size line,
data, CRLF) and one call per chunk.
"""

from __future__ import annotations

from ddump.errors import DdumpError

MAX_SIZE_LINE = 128


class ChunkedError(DdumpError):
    """The body is not valid chunked coding; `payload` is what was good before the fault."""

    def __init__(self, message: str, payload: bytes = b"") -> None:
        super().__init__(message)
        self.payload = payload


class ChunkedDecoder:
    """Feed raw body bytes, get the payload bytes they complete; `done` after the last chunk."""

    def __init__(self) -> None:
        self.done = False
        self._tail = b""  # an incomplete size line or CRLF, never payload
        self._left = 0  # payload bytes still to come in the current chunk
        self._crlf = False  # the current chunk's payload is in: its CRLF is next

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        try:
            return self._feed(data, out)
        except ChunkedError as exc:
            exc.payload = b"".join(out)
            raise

    def _feed(self, data: bytes, out: list[bytes]) -> bytes:
        buf = self._tail + data if self._tail else data
        end = len(buf)
        pos = 0
        while pos < end and not self.done:
            if self._left:
                take = min(self._left, end - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self._left -= take
                self._crlf = not self._left
            elif self._crlf:
                if end - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise ChunkedError("malformed chunked body (a chunk does not end with CRLF)")
                pos += 2
                self._crlf = False
            else:
                stop = buf.find(b"\r\n", pos, pos + MAX_SIZE_LINE)
                if stop < 0:
                    if end - pos >= MAX_SIZE_LINE:
                        raise ChunkedError("malformed chunked body (chunk size line too long)")
                    break
                line = buf[pos:stop]
                pos = stop + 2
                self._left = _chunk_size(line)
                self.done = self._left == 0  # the trailer after it does not matter to us
        self._tail = buf[pos:] if not self.done else b""
        return out[0] if len(out) == 1 else b"".join(out)


def _chunk_size(line: bytes) -> int:
    digits = line.split(b";", 1)[0].strip()
    if not digits or any(c not in b"0123456789abcdefABCDEF" for c in digits):
        raise ChunkedError(f"malformed chunked body (chunk size {line[:20]!r})")
    return int(digits, 16)
