"""The query of `GET /capture`, checked before anything runs (pure: no I/O)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from ddump.pcap import DEFAULT_SNAPLEN
from ddump.protocol import BATCH_PARAM, flag_value
from ddump.worker.filter import FilterError, check_filter

MAX_SNAPLEN = DEFAULT_SNAPLEN  # tcpdump's largest, and the one pcap readers accept
MAX_COUNT = 2**31 - 1  # tcpdump reads -c into an int
MAX_DURATION_NS = 366 * 24 * 3600 * 10**9
NS_PER_S = 10**9

ACCEPTED = (
    "filter (BPF expression)",
    f"snaplen (1..{MAX_SNAPLEN})",
    "count (packets, >= 1)",
    "duration (seconds, > 0)",
    f"{BATCH_PARAM} (0 or 1)",
)
_NAMES = ("filter", "snaplen", "count", "duration", BATCH_PARAM)


@dataclass(frozen=True)
class CaptureParams:
    """What one capture request asked for; None means not given."""

    filter: str | None = None
    snaplen: int | None = None
    count: int | None = None
    duration_ns: int | None = None
    batch: bool = False  # tcpdump without --immediate-mode: packets come in blocks, <= 1 s late


def parse_query(arguments: Mapping[str, Sequence[bytes]]) -> CaptureParams:
    """Check the query arguments of `/capture`; raise FilterError with a message for the user."""
    unknown = sorted(name for name in arguments if name not in _NAMES)
    if unknown:
        raise FilterError(
            f"unknown parameter {', '.join(map(repr, unknown))}; accepted: {', '.join(ACCEPTED)}"
            + (
                " (captures are always on interface 'any', so all streams share one link type)"
                if "interface" in unknown or "i" in unknown
                else ""
            )
        )
    values: dict[str, str] = {}
    for name, raw in arguments.items():
        if len(raw) != 1:
            raise FilterError(f"parameter {name!r} given {len(raw)} times; give it once")
        try:
            values[name] = raw[0].decode("utf-8")
        except UnicodeDecodeError:
            raise FilterError(f"parameter {name!r} is not valid UTF-8") from None
    return CaptureParams(
        filter=check_filter(values["filter"]) if "filter" in values else None,
        snaplen=_integer(values, "snaplen", 1, MAX_SNAPLEN),
        count=_integer(values, "count", 1, MAX_COUNT),
        duration_ns=_duration_ns(values.get("duration")),
        batch=_flag(values, BATCH_PARAM),
    )


def _flag(values: Mapping[str, str], name: str) -> bool:
    text = values.get(name, "0")
    value = flag_value(text)
    if value is None:
        raise FilterError(f"{name} must be 0 or 1, got {text.strip().lower()!r}")
    return value


def _integer(values: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    if name not in values:
        return None
    text = values[name].strip()
    if not text.isascii() or not text.isdigit():
        raise FilterError(f"{name} must be an integer from {low} to {high}, got {text!r}")
    number = int(text)
    if not low <= number <= high:
        raise FilterError(f"{name} must be from {low} to {high}, got {number}")
    return number


def _duration_ns(text: str | None) -> int | None:
    """Seconds as written (`10`, `0.5`), to integer nanoseconds without a float in between."""
    if text is None:
        return None
    try:
        seconds = Decimal(text.strip())
    except InvalidOperation:
        seconds = Decimal("NaN")
    if not seconds.is_finite() or seconds <= 0:
        raise FilterError(f"duration must be a number of seconds > 0, got {text!r}")
    # Compared before any arithmetic: `1e999999999` seconds would overflow or allocate a lot.
    if seconds > MAX_DURATION_NS // NS_PER_S or seconds * NS_PER_S < 1:
        raise FilterError(
            f"duration must be from 1 ns to {MAX_DURATION_NS // NS_PER_S} seconds, got {text!r}"
        )
    return int(seconds * NS_PER_S)
