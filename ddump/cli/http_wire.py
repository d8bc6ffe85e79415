"""The little HTTP/1.1 a capture stream needs, without I/O: a response head, and how its
body ends (by length, in chunks, or at the close)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ddump.cli.chunked import ChunkedDecoder
from ddump.cli.sources import StreamFailure

_HEAD_END = re.compile(rb"\r?\n\r?\n")
_STATUS_LINE = re.compile(r"HTTP/1\.[0-9] ([0-9]{3})(?: (.*))?")


class ConnectionClosed(Exception):
    """The connection closed where the response did not end; `error`: the system's reason
    (None: the peer closed it cleanly)."""

    def __init__(self, error: BaseException | None) -> None:
        super().__init__(str(error) if error else "closed")
        self.error = error


class HeadTooLarge(Exception):
    """No end of the response head within the limit."""


@dataclass
class Head:
    """A response's status line and headers (names in lower case, repeats joined by ", ")."""

    code: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)

    def get(self, name: str, default: str = "") -> str:
        return self.headers.get(name.lower(), default)


def find_head_end(data: bytes | bytearray) -> int | None:
    """Where the head in `data` ends (after its blank line), if it does."""
    match = _HEAD_END.search(data)
    return None if match is None else match.end()


def parse_head(raw: bytes) -> Head:
    """The head as read (up to its blank line); StreamFailure when it is not HTTP/1.x."""
    lines = raw.decode("latin-1").replace("\r\n", "\n").split("\n")
    match = _STATUS_LINE.fullmatch(lines[0].strip())
    if match is None:
        raise StreamFailure(f"not an HTTP response: {lines[0].strip()[:80]!r}")
    head = Head(int(match[1]), (match[2] or "").strip())
    name = ""
    for line in lines[1:]:
        if not line:
            continue
        if line[0] in " \t" and name:  # an obsolete folded line continues the header before
            head.headers[name] += " " + line.strip()
            continue
        name, colon, value = line.partition(":")
        name = name.strip().lower()
        if not colon or not name or " " in name:
            raise StreamFailure(f"malformed response header: {line[:80]!r}")
        value = value.strip()
        known = head.headers.get(name)
        head.headers[name] = value if known is None else f"{known}, {value}"
    return head


class Framing:
    """How a body ends: this one when the connection closes."""

    done = False

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict  # only a clean close ends it: a reset or a timeout cuts it

    def feed(self, data: bytes) -> bytes:
        return data

    def closed(self, error: BaseException | None) -> None:
        """The connection closed: raise ConnectionClosed if that cuts the body short."""
        if error is not None and self.strict:
            raise ConnectionClosed(error)


class _Length(Framing):
    def __init__(self, size: int) -> None:
        self.left = size
        self.done = size == 0

    def feed(self, data: bytes) -> bytes:
        data = data[: self.left]
        self.left -= len(data)
        self.done = self.left == 0
        return data

    def closed(self, error: BaseException | None) -> None:
        raise ConnectionClosed(error)


class _Chunked(Framing):
    def __init__(self) -> None:
        self.decoder = ChunkedDecoder()

    def feed(self, data: bytes) -> bytes:
        payload = self.decoder.feed(data)
        self.done = self.decoder.done
        return payload

    def closed(self, error: BaseException | None) -> None:
        raise ConnectionClosed(error)


def body_framing(head: Head, *, until_close_only: bool = False) -> Framing:
    """How the body of `head` ends. `until_close_only`: a body without length or chunks that
    only a clean close ends."""
    if "chunked" in head.get("Transfer-Encoding").lower():
        return _Chunked()
    length = head.get("Content-Length", "").strip()
    if "content-length" in head.headers:
        if not (length.isascii() and length.isdigit()):
            raise StreamFailure(f"malformed Content-Length: {length[:40]!r}")
        return _Length(int(length))
    return Framing(strict=until_close_only)
