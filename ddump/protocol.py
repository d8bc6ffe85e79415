"""What the worker and the CLI agree on over HTTP: one place for the wire names."""

from __future__ import annotations

from typing import Final

DEFAULT_PORT: Final = 8475
CAPTURE_PATH: Final = "/capture"
PCAP_CONTENT_TYPE: Final = "application/vnd.tcpdump.pcap"
# The worker's wall clock in integer nanoseconds since the epoch, when the response starts.
CLOCK_HEADER: Final = "X-Ddump-Clock"
# The worker's interface map, `1=lo,2=eth0` (see ddump/worker/interfaces.py).
INTERFACES_HEADER: Final = "X-Ddump-Interfaces"
# Names the capture a /capture response streams, for GET /capture/stats?id=NAME.
CAPTURE_HEADER: Final = "X-Ddump-Capture"
STATS_PATH: Final = "/stats"  # appended to the capture path
# Sent by a client that can take a body tcpdump writes itself, ended by the connection closing
# (it then asks GET /capture/stats how the capture ended); answered by a worker that does so.
BODY_HEADER: Final = "X-Ddump-Body"
BODY_DIRECT: Final = "direct"
# `?batch=1`: tcpdump without --immediate-mode. The kernel hands its packets over a block at a
# time, when the block is full or after tcpdump's timeout (1 s, fixed in tcpdump): a packet may
# come this much later than it would otherwise, which the CLI's merge waits for.
BATCH_PARAM: Final = "batch"
BATCH_DELAY_NS: Final = 1_000_000_000


def flag_value(text: str) -> bool | None:
    """A query flag's value as both sides read it: 0/1/false/true (any case); None if neither."""
    return {"0": False, "false": False, "1": True, "true": True}.get(text.strip().lower())
