"""Watching processes through /proc without tripping over their exit."""

from __future__ import annotations

import time


def has_exited(pid: int) -> bool:
    """True when `pid` is gone or a zombie awaiting its reaper.

    A process can vanish between open() and read() of its /proc entry; the read then fails with
    ESRCH (ProcessLookupError), not ENOENT, so both count as gone.
    """
    try:
        with open(f"/proc/{pid}/stat") as status:
            return status.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def exit_time(pid: int, timeout: float) -> float | None:
    """Seconds until `pid` has exited, or None if it still runs after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if has_exited(pid):
            return time.monotonic() - start
        time.sleep(0.01)
    return None
