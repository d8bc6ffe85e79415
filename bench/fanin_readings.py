"""What bench/fanin.py reads off a run: CPU, the CLI's backlog and summary, the output's
records; and its tables (medians and ranges over repeated runs)."""

from __future__ import annotations

import contextlib
import re
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.cpu_per_packet import on_cpu_ns
from bench.fleet import merged_records
from tests.netns import Host, parse_seq

SLL2_LEN = 20


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


@dataclass(frozen=True)
class Summary:
    """What the CLI's summary says."""

    written: int
    late: int
    received: int  # the targets' packets, summed
    dropped: int  # by the kernels, as the targets reported
    problems: list[str]  # warnings, failures and errors, as printed


def summary(log: str) -> Summary:
    written = re.search(r"ddump: (\d+) packets written[^\n]*?(?:, (\d+) of them late)?\n", log)
    received = dropped = 0
    for line in log.splitlines():
        target = re.match(r"\s+\S+\s+(\d+) packets, \d+ bytes(.*)\[", line)
        if target:
            received += int(target.group(1))
            drop = re.search(r"(\d+) dropped by the kernel", target.group(2))
            dropped += int(drop.group(1)) if drop else 0
    # Event lines that are not a target capturing, and targets that did not end stopped.
    problems = [
        line for line in log.splitlines()
        if (line.startswith("ddump: ") and "capturing (filter" not in line
            and "packets written" not in line and "stopping" not in line)
        or (re.match(r"\s+\S", line) and not line.rstrip().endswith("[stopped]"))
    ]  # fmt: skip
    return Summary(
        int(written.group(1)) if written else -1,
        int(written.group(2) or 0) if written else -1,
        received, dropped, problems,
    )  # fmt: skip


@dataclass(frozen=True)
class Record:
    arrival_ns: int
    ts_ns: int
    key: tuple[str, int, int] | None  # destination address, port, sequence number
    late: bool  # earlier than a record written before it


def records(chunks: list[tuple[int, bytes]]) -> Iterator[Record]:
    newest = 0
    for seen in merged_records(chunks):
        data, key = seen.data, None
        if len(data) >= SLL2_LEN + 28 and data[SLL2_LEN] >> 4 == 4:
            ihl = (data[SLL2_LEN] & 0x0F) * 4
            address = ".".join(str(b) for b in data[SLL2_LEN + 16 : SLL2_LEN + 20])
            port = int.from_bytes(data[SLL2_LEN + ihl + 2 : SLL2_LEN + ihl + 4], "big")
            seq = parse_seq(data)
            key = (address, port, seq) if seq is not None else None
        yield Record(seen.arrival_ns, seen.ts_ns, key, seen.ts_ns < newest)
        newest = max(newest, seen.ts_ns)


class Cpu:
    """On-CPU ns of groups of processes between `start()` and `stop()`."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.used: dict[str, int] = {}

    def _now(self) -> dict[str, int]:
        now = {}
        for name, pids in self.groups.items():
            total = 0
            for pid in pids:
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    total += on_cpu_ns(pid)
            now[name] = total
        return now

    def start(self) -> None:
        self.t0, self.c0 = time.monotonic(), self._now()

    def stop(self) -> None:
        """The end of the window (again: a later end; `cores` keeps the first one's)."""
        c1 = self._now()
        self.used = {name: c1[name] - self.c0[name] for name in c1}
        if not hasattr(self, "seconds"):
            self.seconds = time.monotonic() - self.t0
            self.during = dict(self.used)

    def cores(self, name: str) -> float:
        """Cores used in the first window (while the traffic ran)."""
        return self.during[name] / 1e9 / self.seconds


class Backlog(threading.Thread):
    """The bytes that arrived on the CLI's connections and wait for it to read them (the sum of
    their Recv-Q, by `ss`, every 0.5 s): large when the CLI is behind, ~0 when the wait is
    upstream (the workers, tcpdump)."""

    def __init__(self, host: Host) -> None:
        super().__init__(daemon=True)
        self.host = host
        self.samples: list[int] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                out = self.host.run(["ss", "-tnH", "state", "established"], timeout=5).stdout
                self.samples.append(sum(int(line.split()[0]) for line in out.decode().splitlines()
                                        if line.split() and line.split()[0].isdigit()))  # fmt: skip

    def stop(self) -> tuple[float, float]:
        """(median, max) in KiB."""
        self.done.set()
        self.join(10)
        if not self.samples:
            return float("nan"), float("nan")
        return statistics.median(self.samples) / 1024, max(self.samples) / 1024


def print_table(title: str, rows: list[dict[str, float | str]]) -> None:
    if not rows:
        return
    keys = list(rows[0])
    print(f"\n{title}\n")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---:|" * len(keys))
    for row in rows:
        print("| " + " | ".join(fmt(row[k]) for k in keys) + " |", flush=True)


def fmt(value: float | str) -> str:
    if isinstance(value, str):
        return value
    if float(value).is_integer() and abs(value) >= 100:
        return f"{int(value):,}"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"


def medians(rows: list[dict[str, float | str]], by: str) -> list[dict[str, float | str]]:
    """Per value of `by`: each numeric column's median, and its range as `min..max`."""
    out: list[dict[str, float | str]] = []
    for group in dict.fromkeys(row[by] for row in rows):
        same = [row for row in rows if row[by] == group]
        merged: dict[str, float | str] = {}
        for key, value in same[0].items():
            values = [row[key] for row in same]
            if key == by or isinstance(value, str) or len(same) == 1:
                merged[key] = value
            else:
                nums = [float(v) for v in values]
                merged[key] = f"{fmt(statistics.median(nums))} ({fmt(min(nums))}..{fmt(max(nums))})"
        out.append(merged)
    return out


def capturing_times(log: str, started_ns: int) -> list[float]:
    """Seconds from the CLI's start to each target's `capturing` line (its time of day)."""
    day = time.localtime(started_ns / 1e9)
    midnight = time.mktime((*day[:3], 0, 0, 0, 0, 0, day.tm_isdst))
    times = []
    for h, m, sec, ms in re.findall(
        r"^ddump: (\d\d):(\d\d):(\d\d)\.(\d{3}) .*: capturing \(", log, re.M
    ):
        at = midnight + int(h) * 3600 + int(m) * 60 + int(sec) + int(ms) / 1000
        times.append(at - started_ns / 1e9)
    return sorted(times)
