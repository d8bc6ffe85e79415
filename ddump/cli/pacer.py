"""Busy live streams read in common turns: one wakeup then serves every one of them.

tcpdump writes each packet as it takes it (immediate mode), and a worker's tcpdump writes
straight to our connection (X-Ddump-Body: direct): at everyday rates every packet would be a
read, and a wakeup, of its own, and a Python wakeup costs more CPU than tcpdump spends on the
whole packet (BENCHMARKS.md, "CPU per packet"). So a stream that is busy (its last read held
several packets, or came within half a turn of the one before) reads again only at the next
turn, every PACE_S: what arrives meanwhile waits in the kernel's socket buffer, and the turn
reads it in one go, for all busy streams in one pass of the event loop, followed by one
release and one write. A stream that was quiet reads its next packet the moment it comes.

The budget: pacing delays a packet by at most PACE_S, and only while packets come closer
together than that; the first packet after a quiet spell is not delayed.
"""

from __future__ import annotations

import asyncio

PACE_S = 0.002
BUSY_RECORDS = 2  # a read that held this many packets: more are coming


class Pacer:
    """Hands out the next common turn; a timer runs only while some stream waits for one."""

    def __init__(self, period_s: float = PACE_S) -> None:
        self.period_s = period_s
        self._waiting: asyncio.Future[None] | None = None

    def busy(self, records: int, since_last_read_s: float) -> bool:
        """Whether a stream whose read just gave `records` should wait for the next turn."""
        return records >= BUSY_RECORDS or since_last_read_s < self.period_s / 2

    def next_turn(self) -> asyncio.Future[None]:
        """A future done at the next turn (the same one for every stream that asks)."""
        if self._waiting is None:
            loop = asyncio.get_running_loop()
            self._waiting = loop.create_future()
            loop.call_later(self.period_s, self._turn)
        return self._waiting

    def _turn(self) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None and not waiting.done():
            waiting.set_result(None)
