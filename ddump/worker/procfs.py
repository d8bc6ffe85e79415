"""What /proc tells about a tcpdump the worker started: its signal handlers, its sockets."""

from __future__ import annotations

import os
from pathlib import Path

_PACKET_INODE_COLUMN = 8  # /proc/PID/net/packet: sk RefCnt Type Proto Iface R Rmem User Inode


def catches_signal(pid: int, signum: int) -> bool:
    """True when process `pid` has a handler for `signum` (SigCgt in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


def cpu_seconds(pid: int) -> float:
    """CPU time used so far by process `pid` and its children (0.0 if it is gone)."""
    total = 0
    for process in [pid, *_children(pid)]:
        try:
            fields = Path(f"/proc/{process}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat
    return total / _CLOCK_TICKS


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    try:
        return [
            int(child)
            for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()
        ]
    except (OSError, ValueError):
        return []


def holds_packet_socket(pid: int) -> bool:
    """True when process `pid`, or a child of it, has a packet socket open: tcpdump that holds
    one has opened its capture, and what it does before it says "listening" is the filter."""
    pids = [pid, *_children(pid)]
    try:
        lines = Path(f"/proc/{pid}/net/packet").read_text().splitlines()[1:]
    except (OSError, ValueError):
        return False
    packet_sockets = {
        f"socket:[{fields[_PACKET_INODE_COLUMN]}]"
        for fields in (line.split() for line in lines)
        if len(fields) > _PACKET_INODE_COLUMN
    }
    for holder in pids:
        try:
            fds = os.listdir(f"/proc/{holder}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{holder}/fd/{fd}") in packet_sockets:
                    return True
            except OSError:
                continue
    return False
