"""One process pacing numbered UDP datagrams to many namespace hosts at once, with sendmmsg.

    python bench/paced_sender.py < spec.json      (root: it enters the hosts' namespaces)

The spec: {"dests": [[netns, address, port], ...], "rate": per destination per second,
"seconds": how long, "size": payload bytes}. Every destination gets `rate` datagrams a
second, `payload(seq)` of tests/netns.py numbered from 0, its own packets evenly spaced and
the destinations' phases spread evenly over the period (round robin: destination k's n-th
datagram is due at (n + k / len(dests)) / rate). So each host sees its packets one at a time,
as a capture in immediate mode would at that rate, while one process sends for all of them
(not a Python sender per host): it wakes at most every `tick_us` and sends what is due in one
sendmmsg call.

Sent from this (the root) namespace through the fleet's bridge, so each datagram is captured
once, entering the destination's eth0. Each destination has a sink: a socket bound in its
namespace that never reads (a small buffer: the kernel drops what does not fit, and no ICMP
port-unreachable is sent back). Ends after `seconds` (a sender starved of CPU at 2 x `seconds`
+ 5 s, short of its count), or at SIGTERM/SIGINT; prints "ready"
once the sinks are bound and, at the end, one JSON line: sent, seconds, errors, cpu_ns.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import signal
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.netns import payload  # noqa: E402

CLONE_NEWNET = 0x40000000
PR_SET_TIMERSLACK = 29
SEQ_AT = len(b"ddump-seq ")  # the 8 digits of the sequence number start here
MAX_DATAGRAMS = 5_000_000  # the bound on one run


class Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class Msghdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.POINTER(Iovec)),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", Msghdr), ("msg_len", ctypes.c_uint)]


class SockaddrIn(ctypes.Structure):
    _fields_ = [
        ("sin_family", ctypes.c_uint16),
        ("sin_port", ctypes.c_uint16),  # network order
        ("sin_addr", ctypes.c_uint8 * 4),
        ("sin_zero", ctypes.c_uint8 * 8),
    ]


LIBC = ctypes.CDLL(None, use_errno=True)


def on_cpu_ns() -> int:
    with open(f"/proc/{os.getpid()}/schedstat") as f:
        return int(f.read().split()[0])


def sinks(dests: list[tuple[str, str, int]]) -> list[socket.socket]:
    """A bound, never-read socket at each destination, made inside its namespace."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    made = []
    try:
        for netns, address, port in dests:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if LIBC.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {netns}")
            finally:
                os.close(fd)
            sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sink.bind((address, port))
            made.append(sink)
    finally:
        if LIBC.setns(home, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back home")
        os.close(home)
    return made


def send(dests: list[tuple[str, str, int]], rate: int, seconds: float, size: int,
         tick_us: int) -> dict[str, float]:  # fmt: skip
    n = len(dests)
    total = min(int(rate * seconds) * n, MAX_DATAGRAMS)
    buffers = bytearray(payload(0, size) * n)
    base = ctypes.addressof((ctypes.c_char * len(buffers)).from_buffer(buffers))
    names = (SockaddrIn * n)()
    iovs = (Iovec * n)()
    headers = (Mmsghdr * n)()
    for k, (_, address, port) in enumerate(dests):
        names[k].sin_family = socket.AF_INET
        names[k].sin_port = socket.htons(port)
        names[k].sin_addr[:] = list(socket.inet_aton(address))
        iovs[k].iov_base = base + k * size
        iovs[k].iov_len = size
        hdr = headers[k].msg_hdr
        hdr.msg_name = ctypes.addressof(names[k])
        hdr.msg_namelen = ctypes.sizeof(SockaddrIn)
        hdr.msg_iov = ctypes.pointer(iovs[k])
        hdr.msg_iovlen = 1
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    fd = sock.fileno()
    sendmmsg = LIBC.sendmmsg
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    LIBC.prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    per_s = rate * n
    tick = tick_us / 1e6
    cpu0 = on_cpu_ns()
    start = time.monotonic()
    sent = errors = 0
    deadline = start + 2 * seconds + 5  # a sender starved of CPU stops short, and says so
    while sent < total and not stopping:
        now = time.monotonic()
        if now > deadline:
            break
        due = min(total, int((now - start) * per_s) + 1)
        while sent < due:
            k = sent % n
            count = min(due - sent, n - k)
            seq = b"%08d" % (sent // n)
            for j in range(k, k + count):
                at = j * size + SEQ_AT
                buffers[at : at + 8] = seq
            # Never blocking: a full socket buffer (the path through the bridge is behind)
            # drops the batch here, counted, rather than stalling the pace and the time bound.
            done = sendmmsg(fd, ctypes.byref(headers, k * ctypes.sizeof(Mmsghdr)), count,
                            socket.MSG_DONTWAIT)  # fmt: skip
            if done <= 0:  # EAGAIN, ENOBUFS: this batch is lost, say so
                errors += count
                done = count
            sent += done
            if time.monotonic() > deadline:
                break
        wake = max(start + sent / per_s, now + tick)
        ahead = wake - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    took = time.monotonic() - start
    return {"sent": sent - errors, "seconds": took, "errors": errors,
            "cpu_ns": on_cpu_ns() - cpu0, "dests": n, "rate": rate}  # fmt: skip


def main() -> None:
    spec = json.load(sys.stdin)
    dests = [(str(a), str(b), int(c)) for a, b, c in spec["dests"]]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * len(dests) + 64)), hard)
        )
    held = sinks(dests)
    print("ready", flush=True)
    result = send(dests, int(spec["rate"]), float(spec["seconds"]), int(spec.get("size", 64)),
                  int(spec.get("tick_us", 200)))  # fmt: skip
    for sink in held:
        sink.close()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
