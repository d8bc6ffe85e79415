"""Chunked transfer coding decoded from reads split anywhere."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ddump.cli.chunked import ChunkedDecoder, ChunkedError


def encode(parts: list[bytes]) -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts if p)
    return body + b"0\r\n\r\n"


def decode(raw: bytes, cuts: list[int]) -> tuple[bytes, bool]:
    decoder = ChunkedDecoder()
    out = b""
    start = 0
    for cut in [*sorted(cuts), len(raw)]:
        out += decoder.feed(raw[start:cut])
        start = cut
    return out, decoder.done


@given(
    parts=st.lists(st.binary(max_size=300), max_size=20),
    cuts=st.lists(st.integers(0, 7000), max_size=30),
)
def test_any_split_of_the_body_gives_the_same_payload(parts: list[bytes], cuts: list[int]) -> None:
    raw = encode(parts)

    payload, done = decode(raw, [c for c in cuts if c <= len(raw)])

    assert payload == b"".join(parts)
    assert done


def test_chunk_extensions_and_upper_case_sizes_are_read() -> None:
    payload, done = decode(b"A;name=value\r\n0123456789\r\n0\r\n\r\n", [3, 15])

    assert payload == b"0123456789" and done


def test_bytes_after_the_last_chunk_are_ignored() -> None:
    decoder = ChunkedDecoder()

    assert decoder.feed(b"3\r\nabc\r\n0\r\n\r\ngarbage") == b"abc"
    assert decoder.done


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"zz\r\nabc\r\n", "chunk size b'zz'"),
        (b"3\r\nabcXY", "does not end with CRLF"),
        (b"1" * 200, "size line too long"),
        (b"-3\r\nabc\r\n", "chunk size b'-3'"),
    ],
)
def test_malformed_bodies_are_refused(raw: bytes, message: str) -> None:
    with pytest.raises(ChunkedError, match=message.replace("(", r"\(")):
        ChunkedDecoder().feed(raw)


def test_payload_before_a_fault_in_the_same_read_travels_with_the_error() -> None:
    with pytest.raises(ChunkedError) as caught:
        ChunkedDecoder().feed(b"3\r\nabc\r\n2\r\nde\r\nzz\r\n")

    assert caught.value.payload == b"abcde"
