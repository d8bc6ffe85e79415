"""Waiting for a tcpdump to start listening, and what to answer when it does not.

The limit is on tcpdump's CPU time, not wall time: on a busy host a tcpdump that waits for a
CPU is not one whose filter keeps libpcap's optimizer busy (measured: plain filters refused as
"too complex" at load averages of 15-65, when the limit was wall time; BENCHMARKS.md part 7).
Wall time is bounded too, by START_WALL_FACTOR times the limit.
"""

from __future__ import annotations

import asyncio

from ddump.worker.params import NS_PER_S
from ddump.worker.procfs import cpu_seconds

START_WALL_FACTOR = 6
_CHECKS_PER_LIMIT = 4  # how often, per limit's worth of wall time, the CPU time is read


def missing_tcpdump_message(path: str) -> str:
    return (
        f"tcpdump not found at {path!r}: install it (apt-get install tcpdump) "
        "or give its path with ddump-worker --tcpdump PATH"
    )


def filter_too_slow_message(seconds: str) -> str:
    return (
        f"the filter is too complex: tcpdump opened the capture but was still compiling the "
        f"filter after {seconds} of CPU time (libpcap's optimizer can take minutes over a long "
        "chain of `or` terms: 500 `host` terms take about 17 s). Shorten it, e.g. one "
        "`net 10.1.0.0/16` instead of a `host` per address, or split it over several captures"
    )


class NotListening(Exception):
    """tcpdump used its start's CPU time, or waited for a CPU too long (`starved`)."""

    def __init__(self, limit_ns: int, waited_s: float, cpu_s: float, *, starved: bool) -> None:
        super().__init__(f"{waited_s:.1f} s waited, {cpu_s:.1f} s of CPU")
        self.limit_ns, self.waited_s, self.cpu_s, self.starved = limit_ns, waited_s, cpu_s, starved

    def refusal(self, compiling: bool) -> tuple[int, str]:
        """The HTTP status and message; `compiling`: tcpdump had opened its capture."""
        if self.starved:
            return 503, (
                f"tcpdump did not start listening within {self.waited_s:.0f} s, with "
                f"{self.cpu_s:.1f} s of CPU in that time: the host is too busy to run it, or "
                "tcpdump is stuck"
            )
        limit = self.limit_ns
        seconds = f"{limit // NS_PER_S}.{limit % NS_PER_S // 10**8} s"
        if compiling:
            return 400, filter_too_slow_message(seconds)
        return 503, f"tcpdump did not start listening within {seconds} of CPU time"


async def wait_listening(listening: asyncio.Future[bool], pid: int | None, limit_ns: int) -> bool:
    """`listening`'s result once it has one (tcpdump said it listens, or failed); NotListening
    once tcpdump `pid` has used `limit_ns` of CPU time, or waited START_WALL_FACTOR times that."""
    limit_s = limit_ns / NS_PER_S
    loop = asyncio.get_running_loop()
    began = loop.time()
    while True:
        try:
            return await asyncio.wait_for(asyncio.shield(listening), limit_s / _CHECKS_PER_LIMIT)
        except TimeoutError:
            pass
        waited = loop.time() - began
        used = cpu_seconds(pid) if pid is not None else limit_s
        if used >= limit_s:
            raise NotListening(limit_ns, waited, used, starved=False)
        if waited >= limit_s * START_WALL_FACTOR:
            raise NotListening(limit_ns, waited, used, starved=True)
