"""tcpdump's own counts at the end of a session: how many packets each host's kernel dropped
before tcpdump could take them (asked of each worker, read from an SSH target's tcpdump)."""

from __future__ import annotations

import asyncio

from ddump.cli.runs import Run, SessionParts
from ddump.pcapng import CaptureCounts
from ddump.ssh_targets import SshTarget
from ddump.targets import Target

STATS_TIMEOUT_S = 2.0  # for every worker to tell tcpdump's counts at the end
STATS_CONCURRENCY = 16  # asks at once (--reconnect may leave many captures per target)


class DropCounts(SessionParts):
    """Collects tcpdump's counts per target and warns of drops."""

    async def _collect_tcpdump_counts(self) -> None:
        """Ask each worker for tcpdump's counts: its kernel drops are packets nobody will see."""
        asks = [
            (run, target, capture_id)
            for run in self.runs
            if isinstance(target := run.target, Target)
            for capture_id in run.capture_ids
        ]
        if not asks:
            return
        unknown = sum(id_ not in run.final_stats for run, _, id_ in asks)
        if unknown:
            self.reporter.status(f"asking the workers for tcpdump's counts ({unknown} captures)")
        room = asyncio.Semaphore(STATS_CONCURRENCY)

        async def ask(run: Run, target: Target, capture_id: str) -> CaptureCounts:
            final = run.final_stats.get(capture_id)  # told when its direct stream ended
            if final is not None:
                return _counts(final)
            async with room:
                return await self._tcpdump_counts(target, capture_id)

        tasks = [asyncio.ensure_future(ask(*one)) for one in asks]
        _, late = await asyncio.wait(tasks, timeout=STATS_TIMEOUT_S)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        for (run, target, capture_id), task in zip(asks, tasks, strict=True):
            error = "no answer in time" if task in late else task.exception()
            if error is not None:
                run.counts.dropped_unknown += 1
                self.reporter.detail(f"{target.name}: no drop counts from the worker: {error}")
                continue
            answer, known = task.result(), run.tcpdump or CaptureCounts()
            if answer.dropped is None:  # tcpdump was killed before it could count
                run.counts.dropped_unknown += 1
            run.tcpdump = CaptureCounts(
                _add(known.received, answer.received), _add(known.dropped, answer.dropped)
            )
            run.counts.dropped = run.tcpdump.dropped
            if capture_id in run.stalled_captures:
                run.counts.dropped_while_stalled += answer.dropped or 0

    async def _tcpdump_counts(self, target: Target, capture_id: str) -> CaptureCounts:
        from ddump.cli.stream import fetch_stats, stats_target

        timeout = min(STATS_TIMEOUT_S, self.settings.connect_timeout_s)
        answer = await fetch_stats(
            stats_target(target, capture_id), self._tls_context(target), timeout
        )
        return _counts(answer)

    def _take_final_stats(self, run: Run) -> None:
        """A direct stream's end came with tcpdump's exit counts (see stream.py)."""
        # Not isinstance(CaptureStream): importing stream.py loads the HTTP client, which
        # merging files does without.
        told = getattr(run.stream, "final_stats", None) if isinstance(run.target, Target) else None
        if told is not None:
            capture_id, answer = told
            run.final_stats[capture_id] = answer

    def _warn_of_drops(self) -> None:
        lost = [r.counts for r in self.runs if r.counts.dropped_while_stalled]
        if lost:
            # Their tcpdump was blocked behind the dead connection until the worker noticed
            # it: no sign of load, and capturing less would not have saved them. (They may
            # outnumber the gap's packets: that tcpdump can outlive the gap.)
            where = ", ".join(f"{c.name}: {c.dropped_while_stalled}" for c in lost)
            self.reporter.warn(
                f"{sum(c.dropped_while_stalled for c in lost)} packets were dropped by the kernel "
                f"for captures whose connection stalled ({where}): their tcpdump was blocked "
                "behind it, which is no sign of load; what the capture lacks is the gap below"
            )
        dropped = [c for r in self.runs if (c := r.counts).dropped and c.dropped_by_load]
        if not dropped:
            return
        total = sum(c.dropped_by_load for c in dropped)
        at_least = "at least " if any(c.dropped_unknown for c in dropped) else ""
        where = ", ".join(f"{c.name}: {c.dropped_by_load}" for c in dropped)
        self.reporter.warn(
            f"{at_least}{total} packets were dropped by the kernel before tcpdump could take "
            f"them ({where}): capture less (-s 200, a narrower filter), use --batch if a "
            "second of delay is fine, or give ddump-worker a larger --buffer-size"
        )

    def _take_ssh_counts(self, run: Run) -> None:
        """tcpdump's exit counts, which an SSH target's stream read from its stderr."""
        if not isinstance(run.target, SshTarget) or not run.opened:
            return
        answer = getattr(run.stream, "capture_counts", None)
        if answer is None or answer.dropped is None:
            run.counts.dropped_unknown += 1
        known = run.tcpdump or CaptureCounts()
        if answer is not None:
            run.tcpdump = CaptureCounts(
                _add(known.received, answer.received), _add(known.dropped, answer.dropped)
            )
            run.counts.dropped = run.tcpdump.dropped


def _counts(answer: dict[str, object]) -> CaptureCounts:
    return CaptureCounts(
        received=_count(answer, "received"), dropped=_count(answer, "dropped_by_kernel")
    )


def _count(answer: dict[str, object], key: str) -> int | None:
    value = answer.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _add(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else a + b
