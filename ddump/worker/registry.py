"""The captures a worker runs: bounded by --max-captures, shared where identical, all stopped
at shutdown, and their counts kept a while after they end."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from ddump.worker.capture import Capture
from ddump.worker.params import NS_PER_S
from ddump.worker.taps import SharedCapture, Tap
from ddump.worker.tcpdump import TcpdumpStats

ENDED_KEEP = 256  # ended captures whose statistics a client can still ask for...
ENDED_KEEP_S = 600  # ...for this long


@dataclass(frozen=True)
class CaptureEnd:
    """How a capture's stream ended, for a client that cannot tell from the stream itself: one
    whose body tcpdump wrote directly (see direct.py) ends by the connection closing, whether
    tcpdump finished or failed, and learned of a refused start only after its 200 head."""

    how: str  # "clean", "failed" (tcpdump died or was killed) or "refused" (it never started)
    error: str = ""  # what went wrong, for the user
    status: int = 200  # a refusal's HTTP status, as a relayed capture would have answered


@dataclass(frozen=True)
class EndedCapture:
    """What is kept of a capture once its response ended."""

    stats: TcpdumpStats
    end: CaptureEnd | None  # None: the client could tell from its chunked stream


class CaptureRegistry:
    """The captures running now (one per client: a Tap), and the tcpdumps behind them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.closing = False
        self._active: dict[str, Tap] = {}  # by token
        self._running: set[SharedCapture] = set()
        self._joinable: dict[Hashable, SharedCapture] = {}
        self._direct: dict[str, Hashable] = {}  # token -> key of captures tcpdump writes itself
        # token -> (what is kept of it, monotonic time it ended), oldest first
        self._ended: OrderedDict[str, tuple[EndedCapture, float]] = OrderedDict()
        self._untold: set[str] = set()  # ended captures whose client will ask how (direct.py)
        self._idle = asyncio.Event()
        self._idle.set()
        self.started = 0

    def __len__(self) -> int:
        return len(self._active)

    def full(self) -> bool:
        return len(self._active) >= self.limit

    def alone(self, key: Hashable) -> bool:
        """No capture with this `key` runs: a new one may be direct (see direct.py). One that
        does is shared instead, so that N identical captures cost two tcpdumps, not N."""
        shared = self._joinable.get(key)
        return (shared is None or not shared.joinable) and key not in self._direct.values()

    def open(
        self, key: Hashable | None, make: Callable[[], Capture], *, direct_key: Hashable = None
    ) -> tuple[int, Tap]:
        """A capture for one client: joins the running one with the same `key` (None: never
        shared), else runs `make()`'s. Returns its number for the log, and the client's Tap.
        `direct_key`: the key of a capture tcpdump writes itself, which no one can join."""
        shared = self._joinable.get(key) if key is not None else None
        if shared is None or not shared.joinable:
            shared = SharedCapture(make(), self._forget)
            self._running.add(shared)
            if key is not None:
                self._joinable[key] = shared
        tap = shared.join()
        if direct_key is not None:
            self._direct[tap.token] = direct_key
        self._active[tap.token] = tap
        self._idle.clear()
        self.started += 1
        return self.started, tap

    def _forget(self, shared: SharedCapture) -> None:
        self._running.discard(shared)
        for key, value in list(self._joinable.items()):
            if value is shared:
                del self._joinable[key]

    def remove(self, tap: Tap, end: CaptureEnd | None = None, *, will_ask: bool = False) -> None:
        """The client's response ended (`end`: how, if its stream cannot tell; `will_ask`: its
        client is still there to ask for it). Once only."""
        self._direct.pop(tap.token, None)
        if self._active.pop(tap.token, None) is not None and (tap.listening or end is not None):
            self._ended[tap.token] = (EndedCapture(tap.stats, end), time.monotonic())
            if will_ask:
                self._untold.add(tap.token)
            while len(self._ended) > ENDED_KEEP:
                self._ended.popitem(last=False)
        if not self._active:
            self._idle.set()

    def find(self, token: str) -> Tap | EndedCapture | None:
        """The running capture named `token`, or what is kept of a recently ended one."""
        tap = self._active.get(token)
        if tap is not None:
            return tap
        ended = self._ended.get(token)
        self._untold.discard(token)
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

    async def wait_told(self, timeout_ns: int) -> None:
        """Until every client whose stream ended by a close asked how it ended, or time runs
        out (a stopping worker answers them before it stops listening)."""
        deadline = time.monotonic() + timeout_ns / NS_PER_S
        while self._untold and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def wait_idle(self, timeout_ns: int) -> bool:
        """True once every capture's response has ended; False if time ran out first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_ns / NS_PER_S)
        except TimeoutError:
            return False
        return True
