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


def holds_packet_socket(pid: int) -> bool:
    """True when process `pid`, or a child of it, has a packet socket open: tcpdump that holds
    one has opened its capture, and what it does before it says "listening" is the filter."""
    pids = [pid]
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            pids += [int(child) for child in (task / "children").read_text().split()]
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
