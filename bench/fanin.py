"""One CLI, many sources, on a namespace fleet: 64 hosts x 2,000/s, 1,024 streams, 8 x 8 filters.

    sudo .venv/bin/python bench/fanin.py hosts   [--hosts 8,16,32,64] [--rate 2000] [--seconds 10]
    sudo .venv/bin/python bench/fanin.py streams [--hosts 16] [--captures 64] [--rate 10]
    sudo .venv/bin/python bench/fanin.py filters [--hosts 8] [--captures 8] [--rate 100]

Hosts are namespaces of tests/netns.py (198.18.S.0/24 on a bridge; the bridge is given a
static entry for every host's MAC, or it floods each datagram to every host until it has seen
the host send). Each host runs a ddump-worker on :8475; the CLI runs on one more host and
writes to a pipe read here. Traffic comes from one process in the root namespace
(bench/paced_sender.py: sendmmsg, every destination paced at `--rate`, its packets one at a
time, phases spread), numbered per destination, so every record of the output is known.

- hosts: for each count N, one capture (`udp port 5000`) on each of N hosts, each host
  receiving `--rate` datagrams/s, for `--seconds`; the CLI merges the N streams.
- streams: `--captures` captures with distinct filters (`udp port 5000+j`) on each of
  `--hosts` hosts, `--rate` datagrams/s each (1,024 = 16 x 64 live HTTP streams): time to the
  first byte and to every capture started, then `--seconds` of steady state.
- filters: `--captures` distinct filters on each of `--hosts` hosts (64 real tcpdumps), traffic
  flowing before the CLI starts: time to the first byte and the records written late in the
  first `--early` seconds.

Measured: on-CPU time of the CLI, the workers, their tcpdumps and the sender
(/proc/PID/task/*/schedstat, ns) over the traffic window, in cores and per record out; records
sent, in the output, late (the CLI's summary, and counted in the output: a record earlier than
one before it); kernel drops (the workers' `capture N end` lines); latency = time the record
was read from the pipe minus its capture timestamp (one clock: the namespaces share it); the
1-minute load average before and after. Bounded: packets and seconds per step, `--max-seconds`
for the whole run; the fleet (namespaces, every process in them) and the sender are removed
on every way out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The repository root must be on the path first.
from bench.cpu_per_packet import children, on_cpu_ns  # noqa: E402
from bench.fleet import Reader, end_stats, merged_records, percentile, starts, wait_for  # noqa: E402
from tests.netns import Fleet, Host, WorkerProcess, parse_seq, worker_argv  # noqa: E402

WORKER_PORT = 8475
BASE_PORT = 5000
SLL2_LEN = 20
DDUMP = str(REPO / ".venv/bin/ddump")
SENDER = str(REPO / "bench/paced_sender.py")
# The traffic stands for the network: it should come at the offered rate even when what
# captures it is short of CPU, so the sender runs at a higher priority (--sender-nice).
SENDER_NICE: list[int] = [-19]
CLI_NICE: list[int] = [0]
START_WAIT_S = 240  # for every capture of `streams` and `filters` to start


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def group_nice(pid: int, nice: int) -> None:
    """The nice of a session's scheduler group (autogroup; a no-op where it is off).

    With autogroup on (this VM: kernel.sched_autogroup_enabled=1) the scheduler shares the CPU
    between sessions first. tcpdump runs in a session of its own (the worker starts it so), so
    64 tcpdumps were 64 groups against one group holding this bench, the sender, every worker
    and the CLI: the CLI got 0.01 of a core with 6 MB unread in its sockets. Here every
    process runs in a session of its own, and a process's nice is its group's.
    """
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))


def pin_bridge(fleet: Fleet) -> None:
    """Static bridge entries: a datagram to a host that never sent goes to it alone."""
    for index, host in enumerate(fleet.hosts, start=1):
        subprocess.run(
            ["bridge", "-n", fleet.bridge_ns, "fdb", "replace", host.mac, "dev", f"p{index}",
             "master", "static"], check=True, timeout=10,
        )  # fmt: skip


def start_workers(
    hosts: Sequence[Host], env: dict[str, str], extra: Sequence[str]
) -> list[WorkerProcess]:
    """A worker on each host, eight at a time (64 Python start-ups at once on 2 busy cores
    took more than a minute)."""
    workers: list[WorkerProcess] = []
    for at in range(0, len(hosts), 8):
        batch = [
            WorkerProcess(
                worker_argv("--listen", f":{WORKER_PORT}", *extra),
                host,
                env=env,
                start_new_session=True,
            )
            for host in hosts[at : at + 8]
        ]
        workers += batch
        for worker in batch:
            worker.wait_listening(120)
    return workers


class Sender:
    """bench/paced_sender.py in the root namespace; `ready` once its sinks are bound."""

    def __init__(
        self, dests: list[tuple[Host, int]], rate: int, seconds: float, nice: int = 0
    ) -> None:
        spec = {"dests": [[h.netns, h.address, port] for h, port in dests], "rate": rate,
                "seconds": seconds}  # fmt: skip
        self.process = subprocess.Popen(
            ["nice", "-n", str(nice), sys.executable, SENDER],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        group_nice(self.process.pid, nice)
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(spec))
        self.process.stdin.close()
        self.process.stdin = None  # communicate() must not flush it
        line = self.process.stdout.readline()
        if line.strip() != "ready":
            self.process.kill()
            raise RuntimeError(f"the sender did not start: {line!r}")
        self.started_ns = time.time_ns()

    def result(self, timeout: float) -> dict[str, float]:
        assert self.process.stdout is not None
        try:
            out, _ = self.process.communicate(timeout=timeout)
        finally:
            self.ended_ns = time.time_ns()
        return dict(json.loads(out.strip().splitlines()[-1]))

    def stop(self) -> dict[str, float]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.result(15)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


class PipeReader(Reader):
    """A Reader whose thread runs at the sender's priority: on a machine shared with other
    work, the latency measured is then the CLI's, not this thread's wait for a CPU."""

    def run(self) -> None:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SENDER_NICE[0])
        super().run()


class Cli:
    """The real `ddump` on a host, not quiet (its summary is read), its pcap on a pipe."""

    def __init__(self, host: Host, targets: list[str], env: dict[str, str], extra: Sequence[str],
                 nofile: int = 0, nice: int = 0) -> None:  # fmt: skip
        self.errors = tempfile.NamedTemporaryFile(prefix="ddump-cli-", suffix=".log")  # noqa: SIM115
        # The soft limit lowered to `nofile` (the common default, 1,024), the hard one kept.
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        prefix = ["prlimit", f"--nofile={nofile}:{hard}", "--"] if nofile else []
        prefix = ["nice", "-n", str(nice), *prefix]
        self.started_ns = time.time_ns()
        self.process = host.popen(
            [*prefix, DDUMP, *extra, *targets, "-w", "-"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.errors, env=env,
            start_new_session=True,
        )  # fmt: skip
        group_nice(self.process.pid, nice)
        assert self.process.stdout is not None
        self.reader = PipeReader(self.process.stdout.fileno())
        self.reader.start()

    def pid(self) -> int:
        """The ddump process (prlimit execs it: same pid)."""
        return self.process.pid

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.reader.join(timeout)
        return self.process.returncode

    def log(self) -> str:
        return Path(self.errors.name).read_text(errors="replace")

    def first_byte_s(self) -> float:
        return (self.reader.chunks[0][0] - self.started_ns) / 1e9 if self.reader.chunks else -1


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


def tcpdumps(workers: Sequence[WorkerProcess]) -> list[int]:
    return [pid for w in workers for pid in children(w.process.pid)]


def wait_starts(workers: Sequence[WorkerProcess], before: list[int], want: list[int],
                timeout: float) -> None:  # fmt: skip
    wait_for(
        lambda: all(starts(w) - b >= n for w, b, n in zip(workers, before, want, strict=True)),
        timeout, "the captures to start",
    )  # fmt: skip


def drops_of(workers: Sequence[WorkerProcess], ends_before: list[int], timeout: float) -> int:
    """Kernel drops in the `capture N end` lines logged after the first `ends_before`."""

    def ends(worker: WorkerProcess) -> list[str]:
        return re.findall(r"capture \d+ end[^\n]*", worker.log())

    with contextlib.suppress(TimeoutError):
        wait_for(lambda: all(len(ends(w)) > n for w, n in zip(workers, ends_before, strict=True)),
                 timeout, "the captures to end")  # fmt: skip
    return sum(
        end_stats(line).get("dropped", 0)
        for w, n in zip(workers, ends_before, strict=True)
        for line in ends(w)[n:]
    )


def end_counts(workers: Sequence[WorkerProcess]) -> list[int]:
    return [len(re.findall(r"capture \d+ end", w.log())) for w in workers]


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


# ---- the parts ----

Table = list[dict[str, float | str]]


def step_hosts(fleet: Fleet, workers: list[WorkerProcess], n: int, rate: int, seconds: float,
               env: dict[str, str], extra: Sequence[str]) -> dict[str, float | str]:  # fmt: skip
    """N hosts, one capture each, each receiving `rate`/s; the CLI on the fleet's last host."""
    hosts, used = fleet.hosts[:n], workers[:n]
    load0 = loadavg()
    targets = [f"http://{h.address}:{WORKER_PORT}/capture" for h in hosts]
    before, ends0 = [starts(w) for w in used], end_counts(used)
    cli = Cli(fleet.hosts[-1], targets, env, ["--filter", f"udp port {BASE_PORT}", *extra],
              nice=CLI_NICE[0])  # fmt: skip
    try:
        wait_starts(used, before, [1] * n, 60)
        time.sleep(0.5)  # the CLI has the pcap headers
        cpu = Cpu({"cli": [cli.pid()], "workers": [w.process.pid for w in used],
                   "tcpdumps": tcpdumps(used)})  # fmt: skip
        sender = Sender([(h, BASE_PORT) for h in hosts], rate, seconds, SENDER_NICE[0])
        backlog = Backlog(fleet.hosts[-1])
        try:
            cpu.start()
            backlog.start()
            sent = sender.result(seconds * 2 + 30)
            cpu.stop()
        finally:
            sender.kill()
            queued = backlog.stop()
        time.sleep(1.0)  # the tail: max-delay, the pipes (counted per packet, not in cores)
        cpu.stop()
    finally:
        cli.stop()
    load1 = loadavg()
    drops = drops_of(used, ends0, 20)
    said = summary(cli.log())
    out = list(records(cli.reader.chunks))
    wanted = {(h.address, BASE_PORT) for h in hosts}
    keys = {r.key for r in out if r.key is not None and r.key[:2] in wanted}
    low, high = sender.started_ns + 500_000_000, sender.ended_ns - 300_000_000
    lat = [(r.arrival_ns - r.ts_ns) / 1e6 for r in out if low <= r.ts_ns <= high]
    n_out = max(1, len(out))
    return {
        "hosts": n, "offered pkt/s": rate * n, "achieved pkt/s": sent["sent"] / sent["seconds"],
        "sent": sent["sent"], "in output": len(keys), "missing": sent["sent"] - len(keys),
        "CLI in / out": f"{said.received:,} / {said.written:,}", "late": said.late,
        "kernel drops": drops, "p50 ms": percentile(lat, 0.5), "p99 ms": percentile(lat, 0.99),
        "CLI cores": cpu.cores("cli"), "CLI µs/pkt": cpu.used["cli"] / 1e3 / n_out,
        "workers cores": cpu.cores("workers"), "tcpdumps cores": cpu.cores("tcpdumps"),
        "sender cores": sent["cpu_ns"] / 1e9 / sent["seconds"],
        "CLI Recv-Q KiB med / max": f"{queued[0]:,.0f} / {queued[1]:,.0f}",
        "load": f"{load0:.1f}→{load1:.1f}",
    }  # fmt: skip


def part_hosts(args: argparse.Namespace, env: dict[str, str]) -> Table:
    counts = [int(n) for n in args.hosts.split(",")]
    rows: Table = []
    with Fleet(max(counts) + 1) as fleet:
        pin_bridge(fleet)
        workers = start_workers(fleet.hosts[: max(counts)], env, args.worker_args)
        for n in counts:
            for _ in range(args.repeat):
                row = step_hosts(fleet, workers, n, args.rate, args.seconds, env, args.cli_args)
                print_table(f"hosts={n}", [row])
                rows.append(row)
    return rows


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


def many_captures(args: argparse.Namespace, env: dict[str, str], fleet: Fleet,
                  workers: list[WorkerProcess], early_s: float, steady_s: float
                  ) -> dict[str, float | str]:  # fmt: skip
    """`--captures` distinct filters on each worker, traffic already flowing; the CLI starts."""
    hosts = fleet.hosts[: args.hosts]
    dests = [(h, BASE_PORT + j) for h in hosts for j in range(args.captures)]
    targets = [
        f"http://{h.address}:{WORKER_PORT}/capture?filter={quote(f'udp port {port}')}"
        for h, port in dests
    ]
    load0 = loadavg()
    before, ends0 = [starts(w) for w in workers], end_counts(workers)
    bound = START_WAIT_S + early_s + steady_s + 60  # the sender's limit: past the window
    sender = Sender(dests, args.rate, bound, SENDER_NICE[0])
    cpu = Cpu({})
    try:
        time.sleep(1.0)
        cli = Cli(fleet.hosts[-1], targets, env, args.cli_args, args.nofile, CLI_NICE[0])
        try:
            with contextlib.suppress(TimeoutError):
                wait_for(lambda: bool(cli.reader.chunks), 60, "the first byte")
            all_started = -1.0
            with contextlib.suppress(TimeoutError):
                wait_starts(workers, before, [args.captures] * len(workers), START_WAIT_S)
                all_started = (time.time_ns() - cli.started_ns) / 1e9
            # At least `early_s`, and 2 s past the last capture's start (its first records).
            until = max(early_s, all_started + 2.0)
            time.sleep(max(0.0, until - (time.time_ns() - cli.started_ns) / 1e9))
            if steady_s:
                time.sleep(2.0)
                cpu = Cpu({"cli": [cli.pid()], "workers": [w.process.pid for w in workers],
                           "tcpdumps": tcpdumps(workers)})  # fmt: skip
                backlog = Backlog(fleet.hosts[-1])
                cpu.start()
                backlog.start()
                window = time.time_ns()
                time.sleep(steady_s)
                cpu.stop()
                window_end = time.time_ns()
                queued = backlog.stop()
        finally:
            cli.stop()
    finally:
        try:
            sent = sender.stop()
        finally:
            sender.kill()
    load1 = loadavg()
    drops = drops_of(workers, ends0, 30)
    said = summary(cli.log())
    out = list(records(cli.reader.chunks))
    first_record = (out[0].arrival_ns - cli.started_ns) / 1e9 if out else -1
    capturing = capturing_times(cli.log(), cli.started_ns)
    early_end = cli.started_ns + int(early_s * 1e9)
    first_end = (cli.reader.chunks[0][0] if cli.reader.chunks else 0) + int(early_s * 1e9)
    row: dict[str, float | str] = {
        "streams": len(targets),
        "pkt/s each": args.rate,
        "first byte s": cli.first_byte_s(),
        "first record s": first_record,
        "all captures started s": all_started,
        "CLI saw capturing: first / median / last s": " / ".join(
            f"{capturing[int(q * (len(capturing) - 1))]:.1f}" if capturing else "-"
            for q in (0, 0.5, 1)
        ),
        f"late in first {early_s:g} s": sum(r.late for r in out if r.arrival_ns <= early_end),
        f"late in {early_s:g} s from first byte": sum(
            r.late for r in out if r.arrival_ns <= first_end
        ),
        "late (CLI)": said.late,
        "records out": len(out),
        "kernel drops": drops,
    }
    if steady_s:
        steady = [r for r in out if window <= r.arrival_ns <= window_end]
        lat = [(r.arrival_ns - r.ts_ns) / 1e6 for r in steady]
        row |= {
            "late in window": sum(r.late for r in steady), "records/s": len(steady) / steady_s,
            "p50 ms": percentile(lat, 0.5), "p99 ms": percentile(lat, 0.99),
            "CLI cores": cpu.cores("cli"), "workers cores": cpu.cores("workers"),
            "tcpdumps cores": cpu.cores("tcpdumps"),
            "CLI Recv-Q KiB med / max": f"{queued[0]:,.0f} / {queued[1]:,.0f}",
        }  # fmt: skip
    row |= {
        "sender achieved pkt/s": sent["sent"] / sent["seconds"],
        "problems": str(len(said.problems)),
        "load": f"{load0:.1f}→{load1:.1f}",
    }
    for line in said.problems[:5]:
        print(f"  CLI: {line}", flush=True)
    late_targets = sorted(
        ((int(m.group(2)), m.group(1)) for m in re.finditer(
            r"^\s+(\S+ \(udp port \d+\))\s+\d+ packets, \d+ bytes, (\d+) late", cli.log(), re.M)),
        reverse=True,
    )  # fmt: skip
    if late_targets:
        shown = ", ".join(f"{name}: {n}" for n, name in late_targets[:8])
        print(f"  late by target ({len(late_targets)} of {len(targets)} targets): {shown}")
    return row


def part_many(args: argparse.Namespace, env: dict[str, str], early_s: float, steady_s: float
              ) -> Table:  # fmt: skip
    rows: Table = []
    with Fleet(args.hosts + 1) as fleet:
        pin_bridge(fleet)
        extra = ["--max-captures", str(args.captures), *args.worker_args]
        workers = start_workers(fleet.hosts[: args.hosts], env, extra)
        for _ in range(args.repeat):
            row = many_captures(args, env, fleet, workers, early_s, steady_s)
            print_table(f"{args.hosts} hosts x {args.captures} captures", [row])
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["hosts", "streams", "filters"])
    parser.add_argument("--hosts", help="hosts: counts, e.g. 8,16,32,64; else one count")
    parser.add_argument("--captures", type=int, help="distinct filters per host")
    parser.add_argument("--rate", type=int, help="datagrams/s to each capture")
    parser.add_argument("--seconds", type=float, help="traffic (hosts) or steady state (streams)")
    parser.add_argument("--early", type=float, default=3.0, help="start-up window, s")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--nofile", type=int, default=1024,
                        help="the CLI's soft open-files limit (0: inherit)")  # fmt: skip
    parser.add_argument("--worker-args", type=shlex.split, default=None)
    parser.add_argument("--cli-args", type=shlex.split, default=[])
    parser.add_argument("--max-seconds", type=int, default=1800)
    parser.add_argument("--sender-nice", type=int, default=-19)
    parser.add_argument(
        "--cli-nice",
        type=int,
        default=0,
        help="run the CLI at this nice (e.g. -10: as if it "
        "had a core of its own, not shared with the workers of the same machine)",
    )
    args = parser.parse_args()
    SENDER_NICE[0], CLI_NICE[0] = args.sender_nice, args.cli_nice
    defaults = {
        "hosts": ("8,16,32,64", 1, 2000, 10.0, []),
        "streams": ("16", 64, 10, 20.0, ["--buffer-size", "1024"]),
        "filters": ("8", 8, 100, 0.0, []),
    }[args.part]
    args.hosts = args.hosts or defaults[0]
    args.captures = args.captures or defaults[1]
    args.rate = args.rate or defaults[2]
    args.seconds = defaults[3] if args.seconds is None else args.seconds
    args.worker_args = defaults[4] if args.worker_args is None else args.worker_args
    if args.part == "streams" and not args.cli_args:
        args.cli_args = ["-s", "256"]
    if os.geteuid() != 0:
        sys.exit("needs root: network namespaces and packet capture")

    def bail(signum: int, _frame: object) -> None:
        raise SystemExit(f"stopped by {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, bail)
    signal.signal(signal.SIGALRM, bail)
    signal.alarm(args.max_seconds)
    if os.getsid(0) == os.getpid():  # run under `setsid`: this group holds the pipe's reader
        group_nice(os.getpid(), SENDER_NICE[0])
    else:
        print("# not a session leader: run under `setsid -w` for the reader's priority")
    print(f"# {shlex.join(sys.argv)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="ddump-fanin-") as tmp:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        env["PYTHONPATH"] = str(REPO)
        if args.part == "hosts":
            rows = part_hosts(args, env)
            by = "hosts"
        else:
            hosts = int(args.hosts)
            args.hosts = hosts
            steady = args.seconds if args.part == "streams" else 0.0
            rows = part_many(args, env, args.early, steady)
            by = "streams"
    print_table("all runs", rows)
    if args.repeat > 1:
        print_table(f"medians of {args.repeat} (min..max)", medians(rows, by))


if __name__ == "__main__":
    main()
