"""What every handler of one worker shares: its configuration, its captures, and what it
found out about itself (tcpdump's version, whether it can capture at all)."""

from __future__ import annotations

import asyncio
import pwd
from dataclasses import dataclass, field

from ddump.worker.capture import PIPE_SIZE
from ddump.worker.params import NS_PER_S
from ddump.worker.refusals import RefusalLog
from ddump.worker.registry import CaptureRegistry


@dataclass
class WorkerState:
    """What every handler shares: configuration and the running captures."""

    tcpdump: str
    exclusions: tuple[str, ...]
    captures: CaptureRegistry
    drop_to: pwd.struct_passwd | None = None
    start_timeout_ns: int = 10 * NS_PER_S
    stop_grace_ns: int = 2 * NS_PER_S
    abort_grace_ns: int = NS_PER_S // 2
    buffer_kib: int | None = None  # tcpdump -B
    pipe_size: int = PIPE_SIZE  # tcpdump's stdout pipe
    unix_socket: bool = False  # clients have no address then
    share: bool = True  # identical live captures share one tcpdump (see taps.py)
    exposed: tuple[str, ...] = ()  # listening addresses beyond loopback (see listen.py)
    allow: tuple[str, ...] = ()  # --allow networks; empty: anyone who reaches it
    refusals: RefusalLog = field(default_factory=RefusalLog)
    version: dict[str, str] = field(default_factory=dict)  # cached `tcpdump --version`
    version_probe: asyncio.Future[dict[str, str]] | None = None
    capture_probe: asyncio.Future[str | None] | None = None  # see health.capture_check
    capture_checked: tuple[float, str | None] | None = None  # (monotonic time, its answer)
