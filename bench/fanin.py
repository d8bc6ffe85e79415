"""One CLI, many sources, on a namespace fleet: 64 hosts x 2,000/s, 1,024 streams, 8 x 8 filters.

    sudo setsid -w .venv/bin/python bench/fanin.py hosts [--hosts 8,16,32,64] [--rate 2000]
    sudo setsid -w .venv/bin/python bench/fanin.py streams [--hosts 16] [--captures 64] [--rate 10]
    sudo setsid -w .venv/bin/python bench/fanin.py filters [--hosts 8] [--captures 8] [--rate 100]
         [--repeat N] [--cli-nice -19] [--cli-args "-s 256 --connect-timeout 120"] [--seconds S]
         [--cli-cores 0.1]

`setsid`: the bench's own session, whose priority (autogroup) the thread reading the CLI's
pipe gets; `--cli-nice -19` gives the CLI the priority of a process with a core of its own
(see bench/fanin_fleet.py, and BENCHMARKS.md part 7 for why); `--cli-cores 0.1` limits the
CLI to a tenth of a CPU (a cgroup's quota): a CLI short of CPU, as on a busy laptop.

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
import os
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The repository root must be on the path first.
from bench import fanin_fleet  # noqa: E402
from bench.fanin_fleet import (  # noqa: E402
    WORKER_PORT,
    Cli,
    Sender,
    drops_of,
    end_counts,
    group_nice,
    pin_bridge,
    start_workers,
    tcpdumps,
    wait_starts,
)
from bench.fanin_readings import (  # noqa: E402
    Backlog,
    Cpu,
    capturing_times,
    loadavg,
    medians,
    print_table,
    records,
    summary,
)
from bench.fleet import bounded_as_root, percentile, starts, wait_for  # noqa: E402
from tests.netns import Fleet, WorkerProcess  # noqa: E402

BASE_PORT = 5000
START_WAIT_S = 240  # for every capture of `streams` and `filters` to start
CLI_NICE: list[int] = [0]
CLI_CORES: list[float] = [0.0]  # > 0: the CLI's CPU limited to this (a cgroup's quota)


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
              nice=CLI_NICE[0], cores=CLI_CORES[0])  # fmt: skip
    try:
        wait_starts(used, before, [1] * n, 60)
        time.sleep(0.5)  # the CLI has the pcap headers
        cpu = Cpu({"cli": [cli.pid()], "workers": [w.process.pid for w in used],
                   "tcpdumps": tcpdumps(used)})  # fmt: skip
        sender = Sender([(h, BASE_PORT) for h in hosts], rate, seconds, fanin_fleet.SENDER_NICE[0])
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


def worker_start_times(
    workers: Sequence[WorkerProcess], before: list[int], started_ns: int
) -> list[float]:
    """Seconds from the CLI's start to each `capture N start` logged after the first `before`."""
    times = []
    for worker, skip in zip(workers, before, strict=True):
        stamps = re.findall(r"^(\S+ \S+),(\d{3}) \S+ INFO: capture \d+ start", worker.log(), re.M)
        for stamp, ms in stamps[skip:]:
            at = time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000
            times.append(at - started_ns / 1e9)
    return sorted(times)


def spread(times: list[float]) -> str:
    if not times:
        return "-"
    return " / ".join(f"{times[int(q * (len(times) - 1))]:.1f}" for q in (0, 0.5, 1))


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
    sender = Sender(dests, args.rate, bound, fanin_fleet.SENDER_NICE[0])
    cpu = Cpu({})
    try:
        time.sleep(1.0)
        cli = Cli(fleet.hosts[-1], targets, env, args.cli_args, args.nofile, CLI_NICE[0],
                  CLI_CORES[0])  # fmt: skip
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
    started_at = worker_start_times(workers, before, cli.started_ns)
    early_end = cli.started_ns + int(early_s * 1e9)
    first_end = (cli.reader.chunks[0][0] if cli.reader.chunks else 0) + int(early_s * 1e9)
    row: dict[str, float | str] = {
        "streams": len(targets),
        "pkt/s each": args.rate,
        "first byte s": cli.first_byte_s(),
        "first record s": first_record,
        "all captures started s": all_started,
        "workers started captures: first / median / last s": spread(started_at),
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
    parser.add_argument(
        "--cli-cores",
        type=float,
        default=0.0,
        help="limit the CLI to this much of a CPU (a cgroup's quota, e.g. 0.1): a CLI short "
        "of CPU, as on a busy laptop",
    )
    args = parser.parse_args()
    fanin_fleet.SENDER_NICE[0], CLI_NICE[0] = args.sender_nice, args.cli_nice
    CLI_CORES[0] = args.cli_cores
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
    bounded_as_root(args.max_seconds)
    if os.getsid(0) == os.getpid():  # run under `setsid`: this group holds the pipe's reader
        group_nice(os.getpid(), fanin_fleet.SENDER_NICE[0])
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
