"""How a worker's capture ends: asked for (its count or duration), or lost; and when to retry.

A worker ends every response cleanly when it stops (SIGTERM from `systemctl restart`), exactly
as when the capture's own count or duration is reached: the clean end alone says nothing. So the
CLI knows what the target asked for and judges the end by it. Pure code, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from urllib.parse import parse_qs, urlsplit

NS_PER_S = 10**9
# A duration is timed by the worker from just before its answer; we time it from the answer's
# arrival, later by the way here. The end travels the same way, so the two mostly cancel; this
# allows for a busy CLI reading the answer late.
DURATION_SLACK_NS = NS_PER_S // 2

RETRY_FIRST_S = 1.0  # a target that never answered: it may be down for long
RETRY_MAX_S = 30.0
RETRY_LOST_S = 0.25  # the first retry after a capture was lost: a restart takes about this
RETRY_RECENT_S = 0.5  # then this often, while the loss is recent...
RECENT_LOSS_S = 15.0  # ...for this long: a restart or a network blip is over by then
# A retry while the loss is recent connects with at most this timeout: an attempt begun while
# the link was down must not wait out TCP's SYN backoff after it came back.
RECENT_CONNECT_TIMEOUT_S = 2.0

UNASKED_END = (
    "the worker ended the capture unasked (was ddump-worker stopped or restarted, "
    "or did its tcpdump exit?)"
)


@dataclass(frozen=True)
class AskedEnd:
    """What ends a target's capture normally: the `count` and `duration` of its URL."""

    count: int | None = None
    duration_ns: int | None = None

    def reached(self, packets: int, elapsed_ns: int) -> bool:
        """Whether an end after `packets` records and `elapsed_ns` is the one asked for."""
        if self.count is not None and packets >= self.count:
            return True
        if self.duration_ns is None:
            return False
        slack = min(DURATION_SLACK_NS, self.duration_ns // 2)
        return elapsed_ns >= self.duration_ns - slack


def asked_end(url: str) -> AskedEnd:
    """The end a worker URL asks for (the last of each parameter, as the worker reads it)."""
    query = parse_qs(urlsplit(url).query, keep_blank_values=True)
    count = query.get("count", [""])[-1].strip()
    return AskedEnd(
        int(count) if count.isascii() and count.isdigit() else None,
        _duration_ns(query.get("duration", [""])[-1]),
    )


def _duration_ns(text: str) -> int | None:
    try:
        seconds = Decimal(text.strip())
    except InvalidOperation:
        return None
    if not seconds.is_finite() or seconds <= 0 or seconds > 10**9:
        return None
    return int(seconds * NS_PER_S)


def retry_delay(previous_s: float | None, since_loss_s: float | None, just_lost: bool) -> float:
    """Seconds before the next attempt: soon while the target was healthy moments ago.

    `previous_s` is the last delay (None: the first retry); `since_loss_s` the time since its
    capture was lost (None: it never captured); `just_lost`: this attempt had been capturing.
    """
    if just_lost:
        return RETRY_LOST_S
    if since_loss_s is not None and since_loss_s < RECENT_LOSS_S:
        return RETRY_RECENT_S
    if previous_s is None or previous_s < RETRY_FIRST_S:
        return RETRY_FIRST_S
    return min(previous_s * 2, RETRY_MAX_S)
