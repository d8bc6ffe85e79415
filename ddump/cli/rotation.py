"""Rotated output as tcpdump does it: -C SIZE, -G SECONDS, -W FILES, -z COMMAND (no I/O).

What decides, as tcpdump 4.99 does (its `MakeFilename` and `dump_packet_and_trunc`):

- names: the -w name, through strftime (local time) when -G is given, then a number: with -W,
  zero-padded to the digits of N-1 (`-W 20`: 00..19) and from the first file on; without it,
  none on the first file, then 1, 2, ... (`x.pcap`, `x.pcap1`, `x.pcap2`);
- -C: a record goes into the current file while the file is not larger than SIZE bytes before
  it (a file ends at most one record past SIZE); with -W N the numbers wrap to 0, so the file
  replaced is always the oldest, and only files of the ring are ever opened;
- -G: a new file every SECONDS, named by the time it opens (the numbering of -C starts again);
  with -W N, the capture stops when the Nth file is done.

ddump differs in one way: a -G file ends on time even when no packet comes (tcpdump waits for
the next packet), so files tile the time, -z runs when a file is due and -W N bounds the run.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from ddump.errors import UsageError

MB: Final = 1_000_000  # -C counts millions of bytes, as tcpdump does
_TIME_FIELD: Final = re.compile(r"%[^%]")


@dataclass(frozen=True)
class Rotation:
    """-w with -C, -G, -W and -z, checked (see `check`)."""

    template: str
    size: int | None = None  # -C, in bytes
    seconds_ns: int | None = None  # -G
    files: int | None = None  # -W
    command: str | None = None  # -z: a program, run with the finished file's name

    @property
    def ring(self) -> bool:
        """-C with -W: the same N names again and again."""
        return self.files is not None and self.size is not None

    @property
    def rotates(self) -> bool:
        return self.size is not None or self.seconds_ns is not None


def has_time_fields(template: str) -> bool:
    """True when strftime would change the name (`%Y`, `%H`...; `%%` is a plain %)."""
    return bool(_TIME_FIELD.search(template.replace("%%", "")))


def check(rotation: Rotation) -> None:
    """Refuse combinations that cannot do what they say, as usage errors that say why."""
    given = [
        flag
        for flag, value in (
            ("-C", rotation.size),
            ("-G", rotation.seconds_ns),
            ("-W", rotation.files),
            ("-z", rotation.command),
        )
        if value is not None
    ]
    if given and rotation.template == "-":
        raise UsageError(f"{' and '.join(given)} need files: give -w FILE (not stdout)")
    if not rotation.rotates:
        if rotation.files is not None:
            raise UsageError("-W counts rotated files: it needs -C SIZE or -G SECONDS")
        if rotation.command is not None:
            raise UsageError("-z runs on each rotated file: it needs -C SIZE or -G SECONDS")
        return
    if rotation.files is not None and rotation.size is not None and rotation.seconds_ns:
        raise UsageError(
            "-W with both -C and -G is ambiguous (a ring of -C files, or a number of -G "
            "files?): give -W with only one of them"
        )
    if rotation.seconds_ns is not None and not has_time_fields(rotation.template):
        raise UsageError(
            f"-G starts a new file every interval, but -w {rotation.template} has no time "
            "fields, so each would replace the last: put strftime fields in the name "
            "(e.g. -w 'fleet-%Y%m%d-%H%M%S.pcap')"
        )


def parse_size(text: str) -> int:
    """-C's value, millions of bytes ('100', '0.5') -> bytes, exactly (no float)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*", text)
    if not match:
        raise ValueError(f"not a size in millions of bytes: {text!r} (e.g. 100, 0.5)")
    whole, _, fraction = match.group(1).partition(".")
    places: int = 10 ** len(fraction)
    size = int(whole + fraction) * MB // places
    if size < 1:
        raise ValueError(f"must be more than zero: {text!r}")
    return size


def number_width(files: int | None) -> int:
    """Digits of the file numbers with -W N: those of N - 1 (tcpdump's getWflagChars)."""
    if files is None:
        return 0
    return len(str(files - 1)) if files > 1 else 0


def file_name(template: str, *, when_ns: int | None, number: int, width: int) -> str:
    """One file's name: strftime of the template at `when_ns` (if -G), then its number."""
    base = (
        template if when_ns is None else time.strftime(template, time.localtime(when_ns // 10**9))
    )
    if number == 0 and width == 0:
        return base
    return f"{base}{number:0{width}d}"


def records_that_fit(used: int, limit: int, sizes: Iterable[int]) -> tuple[int, int]:
    """How many of the records (by size) go into a file of `used` bytes, and their bytes.

    A record goes in while the file is not larger than `limit` before it, as tcpdump checks.
    """
    count = total = 0
    for size in sizes:
        if used + total > limit:
            break
        total += size
        count += 1
    return count, total


class Plan:
    """Which file comes next, and when the current one is due (no I/O)."""

    def __init__(self, rotation: Rotation) -> None:
        self.rotation = rotation
        self.width = number_width(rotation.files) if rotation.ring else 0
        self.opened = 0  # files started so far
        self.intervals = 0  # -G intervals started so far
        self.interval_ns = 0  # when the current -G interval began
        self._number = 0  # of the current file within the interval (-C), or in the ring

    def first(self, now_ns: int) -> str:
        """The name of the first file."""
        self.intervals = 1
        self.interval_ns = now_ns
        self._number = 0
        return self._name()

    def next_by_size(self) -> str:
        """The current file is full (-C): the name of the next, the oldest of a ring."""
        self._number += 1
        if self.rotation.ring:
            assert self.rotation.files is not None
            self._number %= self.rotation.files
        return self._name()

    def due_ns(self) -> int | None:
        """When the current -G interval ends (None without -G)."""
        if self.rotation.seconds_ns is None:
            return None
        return self.interval_ns + self.rotation.seconds_ns

    def next_by_time(self, now_ns: int) -> str | None:
        """The interval is over (-G): the next file's name, or None when -W N files are done."""
        files = self.rotation.files
        if files is not None and not self.rotation.ring and self.intervals >= files:
            return None
        self.intervals += 1
        self.interval_ns = now_ns
        self._number = 0
        return self._name()

    def _name(self) -> str:
        self.opened += 1
        when = self.interval_ns if self.rotation.seconds_ns is not None else None
        return file_name(
            self.rotation.template, when_ns=when, number=self._number, width=self.width
        )
