"""BPF composition and the tcpdump command line (pure: no I/O).

The worker's own traffic and the operator's exclusions are ANDed around the user's filter. In
libpcap `and` and `or` have the same precedence and associate left to right, so every part is
wrapped in parentheses: `tcp or udp` ANDed without them would read `(X and tcp) or udp`. A user
filter whose parentheses do not balance could close ours early, so it is refused instead.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from ddump.errors import DdumpError

# A real filter is a few hundred bytes; tcpdump itself accepts far more, but nothing useful
# needs 64 KiB and the cap keeps one request from making tcpdump compile megabytes.
MAX_FILTER_LEN = 64 * 1024

# In immediate mode libpcap uses TPACKET_V2, whose ring has fixed slots of the snapshot length:
# the default 2 MiB holds only 8 packets of 262144 bytes (measured: a burst of 5000 while tcpdump
# is stopped keeps 8; -B 32768 keeps 128, and 1310 with -s 1500). A worker's default is larger.
DEFAULT_BUFFER_KIB = 32 * 1024
# Each slot is the snapshot length plus libpcap's headers (82 bytes with libpcap 1.10.3), rounded
# up to 16, in a block of the next power of two: tcpdump's default 262144 makes 262240-byte slots in
# 512 KiB blocks, so -B 32768 pinned 64 MiB for 128 slots. A snapshot length that leaves room
# for the headers fits 256 KiB blocks: the same 128 slots in 32 MiB (traced: -s 262056 still
# fits, 262064 does not), and only packets of 262001..262144 bytes (BIG TCP) lose their tail.
DEFAULT_SNAPLEN = 262000

TCPDUMP_FIXED_ARGS = (
    "-i",
    "any",  # always `any`, so every worker's stream has the same link type
    "-U",  # write each packet as it comes, not a buffer at a time
    "-w",
    "-",
    "--time-stamp-precision=nano",
)
# Unless a capture asks for batches: no kernel ring batching, measured 0.1 ms instead of up to
# 907 ms. It costs: libpcap then uses TPACKET_V2 (a slot of the snapshot length per packet) and
# wakes tcpdump for every packet, measured 3.6 us of tcpdump CPU per packet against 0.5 without
# it (150,000 packets at 30,000/s on loopback). A batch capture gets TPACKET_V3 blocks, which the
# kernel hands over when full or after tcpdump's fixed 1 s timeout (ddump.protocol).
IMMEDIATE_ARG = "--immediate-mode"


class FilterError(DdumpError):
    """A filter the worker refuses before running tcpdump (answered with 400)."""


def check_filter(text: str) -> str | None:
    """Return the filter stripped, None when it is empty; raise FilterError if it is unsafe."""
    if "\x00" in text:
        raise FilterError("filter contains a NUL byte")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_FILTER_LEN:
        # In bytes: one argument of tcpdump's may not exceed 128 KiB (the kernel's limit).
        raise FilterError(f"filter is {size} bytes long; the limit is {MAX_FILTER_LEN}")
    stripped = text.strip()
    if not stripped:
        return None
    check_parentheses(stripped)
    return stripped


def check_parentheses(text: str) -> None:
    """Raise FilterError unless every `)` closes an earlier `(` and none is left open.

    Counting characters is exact for BPF: its lexer makes every `(` and `)` a token of its own
    (even the backslash escape stops at them), and it has no quoting.
    """
    depth = 0
    for position, char in enumerate(text, start=1):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise FilterError(
                    f"unbalanced parentheses in filter: ')' at character {position} closes nothing"
                )
    if depth > 0:
        raise FilterError(f"unbalanced parentheses in filter: {depth} '(' left open")


def self_exclusion(port: int, addresses: Sequence[str] = ()) -> str:
    """The BPF that matches the worker's own listening socket, in both directions.

    With no address, or a wildcard among them, any traffic on the port is ours; bound to
    specific addresses, only traffic to or from those is, and the port stays capturable on
    the host's other addresses.
    """
    hosts: list[str] = []
    for address in addresses:
        try:
            parsed = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return f"tcp port {port}"  # a name: tcpdump may resolve it differently
        if parsed.is_unspecified:
            return f"tcp port {port}"
        if str(parsed) not in hosts:
            hosts.append(str(parsed))
    if not hosts:
        return f"tcp port {port}"
    host_expr = " or ".join(f"host {host}" for host in hosts)
    if len(hosts) > 1:
        host_expr = f"({host_expr})"
    return f"{host_expr} and tcp port {port}"


def compose_filter(user_filter: str | None, exclusions: Sequence[str]) -> str:
    """The filter tcpdump runs: `not (EXCL) and ... and (USER)`; empty when there is nothing."""
    parts = [f"not ({expression})" for expression in exclusions]
    if user_filter is not None:
        check_parentheses(user_filter)
        parts.append(f"({user_filter})")
    return " and ".join(parts)


def tcpdump_argv(
    tcpdump: str,
    bpf: str,
    *,
    snaplen: int | None = None,
    count: int | None = None,
    buffer_kib: int | None = None,
    batch: bool = False,
) -> list[str]:
    """The tcpdump command line: fixed capture options, then the filter after `--`."""
    argv = [tcpdump, *TCPDUMP_FIXED_ARGS]
    if not batch:
        argv.append(IMMEDIATE_ARG)
    if buffer_kib is not None:
        argv += ["-B", str(buffer_kib)]
    argv += ["-s", str(snaplen if snaplen is not None else DEFAULT_SNAPLEN)]
    if count is not None:
        argv += ["-c", str(count)]
    argv.append("--")
    if bpf:
        argv.append(bpf)
    return argv
