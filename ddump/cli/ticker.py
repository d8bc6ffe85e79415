"""The session's clock: what happens with time rather than data.

Records held back are released when the clock lets them out (an idle target's mark moves with
time), targets that answered but stay silent stop holding the others back, a reader gone
(`| head`) is noticed, and the status line is refreshed. Each tick is a wakeup, which costs
more CPU than a packet's whole work: so the ticker comes when the merge says a held record may
be released, every TICK_S while something waits that the clock alone does not settle, and
every IDLE_TICK_S when nothing is held back.
"""

from __future__ import annotations

import asyncio

from ddump.cli.runs import TICK_S, SessionParts

STATUS_EVERY_S = 1.0
READER_CHECK_S = 0.1  # a reader gone (`| head`) is seen this soon while nothing is written
IDLE_TICK_S = READER_CHECK_S  # nothing held back: the ticker has only that to do
MIN_TICK_S = 0.001  # a release due sooner waits this long, with whatever came meanwhile
STARTUP_GRACE_S = 1.0  # at most this (or --max-delay, if longer) waiting for targets to start


class Ticker(SessionParts):
    """The session's timed work (see the module)."""

    _tick_wake: asyncio.Future[None] | None  # the ticker's sleep, while it sleeps
    _tick_at: float  # loop time it ends
    _tick_timer: asyncio.TimerHandle | None

    def _start_silent_streams(self, now: float) -> None:
        # A worker sends the pcap header as soon as tcpdump starts; one that answered but stays
        # silent must not hold the others back for longer than --max-delay either.
        grace = self.settings.max_delay_ns / 1e9
        for index in list(self._awaiting_header):
            run = self.runs[index]
            if run.opened_at is None or now - run.opened_at > grace:
                self._awaiting_header.discard(index)
                if run.opened_at is not None:
                    run.opened_at = None
                    self.merger.start_stream(run.index, run.clock_offset_ns)

    async def _tick_sleep(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        self._tick_wake = wake = loop.create_future()
        self._tick_at = loop.time() + seconds
        self._tick_timer = loop.call_at(self._tick_at, _resolve, wake)
        try:
            await wake
        finally:
            self._tick_timer.cancel()
            self._tick_wake = self._tick_timer = None

    def _tick_by(self, wait_s: float) -> None:
        """Records held back may be released in `wait_s`: the ticker runs by then."""
        wake = self._tick_wake
        at = asyncio.get_running_loop().time() + max(wait_s, MIN_TICK_S)
        timer = self._tick_timer
        if wake is not None and timer is not None and not wake.done() and at < self._tick_at:
            timer.cancel()
            self._tick_at = at
            self._tick_timer = asyncio.get_running_loop().call_at(at, _resolve, wake)

    async def _tick(self) -> None:
        next_status = next_reader_check = 0.0
        last_packets = 0
        loop = asyncio.get_running_loop()
        # Output waits for every target to start, to know its clock and link type first; but
        # a target still connecting after the grace (an unreachable host waits out the whole
        # connect timeout) is then treated like a quiet one, instead of holding everything.
        grace_ends = loop.time() + max(STARTUP_GRACE_S, self.settings.max_delay_ns / 1e9)
        while True:
            # A tick costs a wakeup, more than a packet's whole work: it comes when records held
            # back may be released (the merge knows when the clock alone will allow it; a
            # release that leaves some calls _tick_by), else every TICK_S while something waits
            # that the clock alone does not settle, else every IDLE_TICK_S.
            wait_s = self._release_wait_s()
            if wait_s is None:
                held = self.merger.buffered or self.staged or self._awaiting_header
                wait_s = TICK_S if held else IDLE_TICK_S
            await self._tick_sleep(min(max(wait_s, MIN_TICK_S), IDLE_TICK_S))
            if grace_ends and loop.time() > grace_ends:
                grace_ends = 0.0
                self._stop_waiting_for_silent_streams()
            if self._awaiting_header:
                self._start_silent_streams(loop.time())
            if self.merger.buffered or self.staged:  # else a release has nothing to do
                self._release()
            # A poll per tick cost more than the tick's other work for a quiet capture: a
            # reader gone (`| head`) is seen within READER_CHECK_S instead.
            now = loop.time()
            if now >= next_reader_check:
                next_reader_check = now + READER_CHECK_S
                if self.output.reader_gone():
                    self._take_output_error()
                    self.stop(str(self.output.error or "output closed"))
            if self.reporter.live and now >= next_status:
                packets = self.output.records
                rate = (packets - last_packets) / STATUS_EVERY_S if next_status else 0.0
                last_packets = packets
                next_status = now + STATUS_EVERY_S
                capturing = sum(r.counts.state == "capturing" for r in self.runs)
                self.reporter.status(
                    f"{capturing}/{len(self.runs)} targets capturing, {packets} packets, "
                    f"{rate:.0f} pkt/s, {self.output.bytes / 1e6:.1f} MB{self.output.where}"
                )


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
