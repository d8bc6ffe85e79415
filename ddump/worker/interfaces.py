"""The host's interface index -> name map, sent with every capture as `X-Ddump-Interfaces`.

A capture on `any` gives LINUX_SLL2 records that carry the interface *index* only; the name is
known on the capturing host alone, so the worker tells it (pcapng output names each interface
`host:eth0` with it).

Header value: comma-separated `INDEX=NAME` items in increasing index order, e.g.
`1=lo,2=eth0,7=br-0a1b`. INDEX is decimal. NAME is the name's bytes percent-encoded, every byte
but the RFC 3986 unreserved characters (`A-Z a-z 0-9 - . _ ~`), so that `,`, `=`, `%`, spaces
and non-ASCII bytes, all legal in Linux interface names, survive. Readers ignore items that are
not `INDEX=NAME`.

The map is taken when the capture starts: an interface created later is missing from it, and a
deleted interface's index may name a new one. The value is capped at MAX_VALUE_BYTES, because
nginx refuses (502) an upstream response whose head exceeds its `proxy_buffer_size`, one memory
page (4 KiB) by default; the worker's other headers take about 300 bytes. A map that does not
fit keeps the lowest indexes (loopback and physical NICs, created at boot; container veths come
later and higher) and ends with the item `...`; a reader names the missing ones by index.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from typing import Final
from urllib.parse import quote

from ddump import protocol

INTERFACES_HEADER: Final = protocol.INTERFACES_HEADER  # the name tests and callers know
MAX_VALUE_BYTES: Final = 2048
TRUNCATED: Final = "..."


def format_interfaces(interfaces: Iterable[tuple[int, str]], limit: int = MAX_VALUE_BYTES) -> str:
    """The header value for (index, name) pairs: `1=lo,2=eth0`, at most `limit` bytes."""
    # Names come from the kernel as bytes (surrogate-escaped by Python): encode those bytes.
    items = [f"{index}={quote(os.fsencode(name), safe='')}" for index, name in sorted(interfaces)]
    value = ",".join(items)
    if len(value) <= limit:
        return value
    kept: list[str] = []
    size = len(TRUNCATED)
    for item in items:
        if size + len(item) + 1 > limit:
            break
        kept.append(item)
        size += len(item) + 1
    return ",".join([*kept, TRUNCATED])


def interfaces_header() -> str:
    """The current network namespace's map as a header value; empty if it cannot be read."""
    # if_nameindex() asks the kernel (netlink) about the namespace this process is in, whereas
    # /sys/class/net shows the namespace sysfs was mounted in, which differs under `nsenter` and
    # in containers that do not remount /sys.
    try:
        return format_interfaces(socket.if_nameindex())
    except OSError:
        return ""
