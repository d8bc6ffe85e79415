"""Refused requests and connections, each logged, at a bounded rate.

An operator reading the log must see every kind of refusal (a bad filter, too many captures,
a connection from an address not allowed, one past --max-connections) with the client's
address; but a flood of them (a scanner, a misconfigured load balancer, a client retrying in
a loop) must not flood the log. So each refusal gets its own line, up to BURST lines in
WINDOW_S; past that they are counted, and the count is logged when the window ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

log = logging.getLogger("ddump.worker")

BURST = 20  # lines per window
WINDOW_S = 10.0


class RefusalLog:
    """Logs refusals one line each, at most `burst` lines per `window_s`; counts the rest."""

    def __init__(
        self,
        burst: int = BURST,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.window_s = window_s
        self.clock = clock
        self.total = 0  # every refusal since the start, logged or not
        self._window_start = -window_s
        self._logged = 0  # lines in the current window
        self._unlogged = 0  # refusals counted but not logged in the current window
        self._flush: asyncio.TimerHandle | None = None

    def refused(self, message: str) -> bool:
        """Log one refusal (`message` says what was refused, from whom, why); False when the
        rate limit held it back (it is counted, and the count logged at the window's end)."""
        self.total += 1
        now = self.clock()
        if now - self._window_start >= self.window_s:
            self.flush()
            self._window_start = now
            self._logged = 0
        if self._logged < self.burst:
            self._logged += 1
            log.warning("%s", message)
            return True
        self._unlogged += 1
        self._schedule_flush()
        return False

    def flush(self) -> None:
        """Log how many refusals the rate limit held back, if any."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._unlogged:
            log.warning(
                "refused %d more request(s) or connection(s) in %g s without a line each "
                "(at most %d lines per %g s; %d refused since the start)",
                self._unlogged,
                self.window_s,
                self.burst,
                self.window_s,
                self.total,
            )
            self._unlogged = 0

    def _schedule_flush(self) -> None:
        if self._flush is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop (a unit test): the next refusal after the window says it
        delay = max(0.0, self._window_start + self.window_s - self.clock())
        self._flush = loop.call_later(delay, self.flush)
