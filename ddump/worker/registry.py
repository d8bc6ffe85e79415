"""The captures a worker runs: bounded by --max-captures, shared where identical, all stopped
at shutdown, and their counts kept a while after they end."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

from ddump.worker.capture import Capture
from ddump.worker.params import NS_PER_S
from ddump.worker.taps import SharedCapture, Tap
from ddump.worker.tcpdump import TcpdumpStats

ENDED_KEEP = 256  # ended captures whose statistics a client can still ask for...
ENDED_KEEP_S = 600  # ...for this long


class CaptureRegistry:
    """The captures running now (one per client: a Tap), and the tcpdumps behind them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.closing = False
        self._active: dict[str, Tap] = {}  # by token
        self._running: set[SharedCapture] = set()
        self._joinable: dict[Hashable, SharedCapture] = {}
        # token -> (statistics, monotonic time it ended), oldest first
        self._ended: OrderedDict[str, tuple[TcpdumpStats, float]] = OrderedDict()
        self._idle = asyncio.Event()
        self._idle.set()
        self.started = 0

    def __len__(self) -> int:
        return len(self._active)

    def full(self) -> bool:
        return len(self._active) >= self.limit

    def open(self, key: Hashable | None, make: Callable[[], Capture]) -> tuple[int, Tap]:
        """A capture for one client: joins the running one with the same `key` (None: never
        shared), else runs `make()`'s. Returns its number for the log, and the client's Tap."""
        shared = self._joinable.get(key) if key is not None else None
        if shared is None or not shared.joinable:
            shared = SharedCapture(make(), self._forget)
            self._running.add(shared)
            if key is not None:
                self._joinable[key] = shared
        tap = shared.join()
        self._active[tap.token] = tap
        self._idle.clear()
        self.started += 1
        return self.started, tap

    def _forget(self, shared: SharedCapture) -> None:
        self._running.discard(shared)
        for key, value in list(self._joinable.items()):
            if value is shared:
                del self._joinable[key]

    def remove(self, tap: Tap) -> None:
        """The client's response ended."""
        if self._active.pop(tap.token, None) is not None and tap.listening:
            self._ended[tap.token] = (tap.stats, time.monotonic())
            while len(self._ended) > ENDED_KEEP:
                self._ended.popitem(last=False)
        if not self._active:
            self._idle.set()

    def find(self, token: str) -> Tap | TcpdumpStats | None:
        """The running capture named `token`, or the statistics of a recently ended one."""
        tap = self._active.get(token)
        if tap is not None:
            return tap
        ended = self._ended.get(token)
        if ended is None or time.monotonic() - ended[1] > ENDED_KEEP_S:
            return None
        return ended[0]

    def stop_all(self, reason: str) -> None:
        self.closing = True
        for shared in list(self._running):
            shared.stop(reason)

    def abort_all(self, reason: str) -> None:
        self.closing = True
        for shared in list(self._running):
            shared.abort(reason)

    async def wait_idle(self, timeout_ns: int) -> bool:
        """True once every capture's response has ended; False if time ran out first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_ns / NS_PER_S)
        except TimeoutError:
            return False
        return True
