"""What every source of records (a worker's stream, a capture file) tells the session.

Kept apart from the HTTP client so that merging files loads none of it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from ddump.errors import DdumpError


class StreamFailure(DdumpError):
    """The stream failed; the message says why, for the user."""


class StreamStalled(StreamFailure):
    """The connection went dead: nothing came back from the peer for `silent_ns`."""

    def __init__(self, message: str, silent_ns: int) -> None:
        super().__init__(message)
        self.silent_ns = silent_ns


@dataclass(frozen=True)
class Opened:
    """What the response headers told us."""

    # Worker clock minus ours, when the worker sent its clock: at least `clock_offset_ns` (its
    # clock was read before we got the headers), at most that plus `clock_spread_ns` (it was
    # read after we sent the request).
    clock_offset_ns: int | None
    worker_clock_ns: int | None = None
    interfaces: Mapping[int, str] = field(default_factory=dict)  # the worker's ifindex -> name
    clock_spread_ns: int = 0
    capture_id: str | None = None  # names the capture for GET /capture/stats (newer workers)
    # False: the worker answered before its tcpdump started (a direct body), which it has not
    # yet; the same Opened follows with True once it has.
    started: bool = True


DataCallback = Callable[[bytes], Awaitable[None] | None]  # awaited: backpressure
OpenedCallback = Callable[[Opened], None]
