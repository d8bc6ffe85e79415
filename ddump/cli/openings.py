"""A target's capture opens: its clock learned and checked, the gap before it closed."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from ddump.cli.files import FileSource
from ddump.cli.report import Gap
from ddump.cli.runs import LIVE, Run, SessionParts
from ddump.cli.sources import Opened


class Openings(SessionParts):
    """What the session does when a target answers and its capture starts (or starts again)."""

    def _reopened(self, run: Run, opened: Opened) -> None:
        """A capture of the target runs (again): the gap before it, if any, ends now."""
        if not opened.started:
            self._answered(run, opened)
            return
        failed, error = run.failed, run.counts.error
        self._on_opened(run, opened)
        run.capturing_since = asyncio.get_running_loop().time()
        now = time.time_ns()
        gaps = run.counts.gaps
        if gaps and gaps[-1].end_ns is None:
            gaps[-1] = replace(gaps[-1], end_ns=now)
            lost_s = (now - gaps[-1].start_ns) / 1e9
            self.reporter.info(f"{run.target.name}: back after {lost_s:.1f} s not captured")
        elif failed and not run.answered and isinstance(run.target, LIVE):
            # It failed at first: it was not captured from the start until now.
            gaps.append(Gap(self._started_ns, now, error))
        run.answered = True

    def _answered(self, run: Run, opened: Opened) -> None:
        """The worker answered with its clock, and its tcpdump is yet to start: every packet
        it captures is newer than the answer, so the others need not wait for its start (the
        merge holds it like a quiet target, by the clock)."""
        if opened.clock_offset_ns is None or run.opened is not None:
            return
        run.clock_offset_ns = opened.clock_offset_ns
        run.clock_offset_high_ns = opened.clock_offset_ns + opened.clock_spread_ns
        run.clock_known = True
        self.merger.start_stream(run.index, run.clock_offset_ns)

    def _on_opened(self, run: Run, opened: Opened) -> None:
        run.counts.state = "capturing"
        run.failed = False
        run.counts.error = ""
        offset = opened.clock_offset_ns
        run.clock_offset_ns = offset or 0
        run.clock_known = offset is not None or isinstance(run.target, FileSource)
        if not run.clock_known:
            run.counts.no_clock = True
        run.clock_offset_high_ns = run.clock_offset_ns + (
            opened.clock_spread_ns if offset is not None else 0
        )
        run.opened = opened
        run.opened_at = asyncio.get_running_loop().time()
        self._awaiting_header.add(run.index)
        if opened.capture_id is not None:
            run.capture_ids.append(opened.capture_id)
        note = ""
        if offset is not None:
            # The worker reads its clock just before it answers: the low end is the estimate.
            note = f", clock offset {offset / 1e6:+.1f} ms"
            self._check_clock(run, offset, offset + opened.clock_spread_ns)
        if isinstance(run.target, FileSource):
            self.reporter.detail(f"{run.target.name}: reading")
            return
        what = f"filter {run.target.filter!r}" if run.target.filter else "no filter"
        if not run.clock_known:
            note = ", no clock: ordered by its packets' own timestamps"
        self.reporter.info(f"{run.target.name}: capturing ({what}{note})")

    def _check_clock(self, run: Run, low: int, high: int) -> None:
        limit = self.settings.max_delay_ns
        if low <= limit and high >= -limit:
            return
        gap = low if low > limit else -high
        self.reporter.warn(
            f"{run.target.name}: its clock is at least {gap / 1e9:.3f} s "
            f"{'ahead of' if low > limit else 'behind'} this host, more than --max-delay "
            f"({limit / 1e9:g} s): synchronize clocks (NTP) or raise --max-delay, or its "
            "packets will be written late"
        )

    def _learn_clock(self, run: Run, newest_ns: int) -> None:
        # A packet cannot arrive before it was captured: each batch's newest timestamp minus
        # our time bounds the worker's clock offset from below, better than the headers did.
        # Without a clock header, the first packet gives the first bound: a replayed trace or
        # a clock minutes off then merges by its own timestamps, not all at once.
        low = newest_ns - time.time_ns()
        if low > run.clock_offset_ns or not run.clock_known:
            run.clock_known = True
            run.clock_offset_ns = low
            self.merger.start_stream(run.index, low)
