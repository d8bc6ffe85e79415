"""`ssh://` targets against worker targets, on network namespaces: latency, CPU, first byte.

    sudo .venv/bin/python bench/ssh.py [--rate 5000] [--seconds 5] [--hosts 16] [--runs 3]
        [--rounds 2] [--kinds worker,ssh,bare] [--client-config 'Ciphers aes128-gcm@openssh.com']

Needs root, `ip`, tcpdump, sshd and ssh (the tests' sshd setup: tests/sshd.py).

- latency: h1..h3 each run sshd and a worker; the CLI runs on h4 and writes to a pipe read here
  (bench/fleet.py's way). h1->h2, h2->h3, h3->h1 send `--rate` numbered datagrams/s each for
  `--seconds`, with the three as worker targets, as ssh:// targets (sudo tcpdump), and "bare":
  no ddump, three plain `ssh HOST sudo -n tcpdump ... -w -` read here (the transport alone,
  each stream on its own, no merge), `--rounds` times in turn. Latency: read time minus
  capture timestamp, while every flow sends. CPU per million packets passed on: remote
  (workers, or sshd + sh) and local (the CLI + its ssh processes). `--client-config` lines go
  into the client's ssh_config (the user's ~/.ssh/config) before the run. Kind "ssh-before"
  runs the `--before` command as the CLI instead, e.g. an earlier commit's code:
      git archive COMMIT | tar -x -C /tmp/before && cp ddump/_records*.so /tmp/before/ddump/
      --before "env PYTHONPATH=/tmp/before:$PWD/.venv/lib/python3.11/site-packages
                .venv/bin/python -P -S -c 'from ddump.cli.main import main; main()'"
  (-P -S: not the editable install's ddump, which would come first).
- first byte: `--hosts` hosts each run sshd; the CLI (on one more host) captures on all of
  them over SSH (`--per-host` targets on each): the time from its start to the first byte of
  output, `--runs` times (and as many of the `--before` CLI, in turn).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import select
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import fleet as fb  # noqa: E402  (bench/fleet.py: its reader, flows and percentiles)

from ddump.worker.filter import DEFAULT_BUFFER_KIB, tcpdump_argv  # noqa: E402
from tests.netns import Fleet, Host, WorkerProcess, worker_argv  # noqa: E402
from tests.sshd import SshSite  # noqa: E402

BEFORE: list[str] = []  # --before: another CLI to compare, e.g. an earlier commit's


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):  # exited meanwhile
            total += fb.cpu_seconds(pid)
    return total


def _reads(pids: list[int]) -> int:
    """read system calls made (/proc/PID/io syscr): the CLI's wakeups for its input."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/io").read_text().splitlines():
                if line.startswith("syscr:"):
                    total += int(line.split()[1])
    return total


def _named(hosts: list[Host], names: set[str]) -> list[int]:
    return [pid for host in hosts for pid in host.pids() if _comm(pid) in names]


class Bare:
    """Plain `ssh HOST sudo -n tcpdump -w -` to each host, each read by a Reader of its own."""

    def __init__(self, cli_host: Host, sources: list[Host], env: dict[str, str]) -> None:
        argv = tcpdump_argv("tcpdump", fb.FILTER, buffer_kib=DEFAULT_BUFFER_KIB)
        command = "sudo -n " + " ".join(shlex.quote(word) for word in argv)
        self.processes = [
            cli_host.popen(
                ["ssh", "-T", "-o", "BatchMode=yes", "-e", "none", h.address, command],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=env,
            )
            for h in sources
        ]
        self.readers = []
        for process in self.processes:
            assert process.stdout is not None
            reader = fb.Reader(process.stdout.fileno())
            reader.start()
            self.readers.append(reader)

    def stop(self) -> None:
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.close()  # ssh ends the session: the remote tcpdump gets SIGHUP
            process.terminate()
        for process in self.processes:
            process.wait(10)
        for reader in self.readers:
            reader.join(10)


def latency_step(
    fleet: Fleet, site: SshSite, workers: list[WorkerProcess], kind: str, rate: int, seconds: float
) -> tuple[float, str]:
    """One run of `kind`: (p99 ms, its table row)."""
    sources = fleet.hosts[:3]
    cli_host = fleet.hosts[3]
    flows = [fb.Flow(h, sources[(i + 1) % 3], fb.BASE_PORT + i) for i, h in enumerate(sources)]
    bare = cli = None
    if kind == "bare":
        bare = Bare(cli_host, sources, site.env)
    elif kind == "worker":
        cli = fb.Cli(
            cli_host, [f"http://{h.address}:{fb.WORKER_PORT}/capture" for h in sources], site.env
        )
    else:
        ssh_targets = [f"ssh://{h.address}?sudo=1" for h in sources]
        if kind == "ssh-before":
            fb.DDUMP, before = BEFORE, fb.DDUMP
            try:
                cli = fb.Cli(cli_host, ssh_targets, site.env)
            finally:
                fb.DDUMP = before
        else:
            cli = fb.Cli(cli_host, ssh_targets, site.env)
    try:
        fb.wait_for(
            lambda: all(any(_comm(p) == "tcpdump" for p in h.pids()) for h in sources),
            20,
            "tcpdump on every host",
        )
        time.sleep(1.0)
        ssh = _named([cli_host], {"ssh"})
        if kind == "worker":
            remote = [w.process.pid for w in workers]
        else:
            remote = _named(sources, {"sshd", "sh"})
        local = [cli.process.pid] if cli is not None else []
        before = _cpu(remote), _cpu(local), _cpu(ssh), _reads(local)
        count = int(rate * seconds)
        fb.send(flows, count, rate)
        time.sleep(1.0)
        after = _cpu(remote), _cpu(local), _cpu(ssh), _reads(local)
    finally:
        if cli is not None:
            cli.stop()
        if bare is not None:
            bare.stop()
    streams = [cli.reader.chunks] if cli is not None else [r.chunks for r in bare.readers]
    ports = {f.port for f in flows}
    timed, records = [], 0
    for chunks in streams:
        for seen in fb.merged_records(chunks):
            records += 1
            key = fb.flow_key(seen.data)
            if key is not None and key[0] in ports:
                timed.append((key[0], seen.ts_ns, seen.arrival_ns - seen.ts_ns))
    first = max(min(ts for p, ts, _ in timed if p == port) for port in ports) + 200_000_000
    last = min(max(ts for p, ts, _ in timed if p == port) for port in ports) - 200_000_000
    latencies = [lat / 1e6 for _, ts, lat in timed if first <= ts <= last]
    per_m = 1e6 / max(1, records)
    p99 = fb.percentile(latencies, 0.99)
    return p99, (
        f"| {kind} | {rate:,} x 3 | {records:,} of {2 * count * 3:,} "
        f"| {fb.percentile(latencies, 0.5):.2f} / {p99:.2f} "
        f"| {(after[0] - before[0]) * per_m:.1f} "
        f"| {(after[1] - before[1]) * per_m:.1f} + {(after[2] - before[2]) * per_m:.1f} "
        f"| {(after[3] - before[3]) * 1000 / max(1, records):.0f} |"
    )


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def part_latency(
    rate: int, seconds: float, rounds: int, kinds: list[str], client_lines: list[str]
) -> None:
    print(
        "| targets | pkt/s per flow | records in output | latency ms p50 / p99 "
        "| remote CPU s per M (workers, or sshd + sh) | local CPU s per M (CLI + ssh) "
        "| CLI reads per 1,000 records |\n"
        "|---|---:|---:|---:|---:|---:|---:|"
    )
    p99s: dict[str, list[float]] = {kind: [] for kind in kinds}
    with Fleet(4) as fleet, SshSite(client_lines) as site:
        for host in fleet.hosts[:3]:
            site.serve(host)
        workers = [
            WorkerProcess(worker_argv("--listen", f":{fb.WORKER_PORT}"), h) for h in fleet.hosts[:3]
        ]
        try:
            for worker in workers:
                worker.wait_listening()
            for _ in range(rounds):
                for kind in kinds:
                    p99, row = latency_step(fleet, site, workers, kind, rate, seconds)
                    p99s[kind].append(p99)
                    print(row, flush=True)
        finally:
            for worker in workers:
                worker.__exit__()
    for kind, values in p99s.items():
        print(f"p99 ms of {kind}: median (min-max) of {len(values)}: {_spread(values)}")
    if "worker" in p99s and "ssh" in p99s:
        ratios = [s / w for w, s in zip(p99s["worker"], p99s["ssh"], strict=True)]
        print(f"ssh p99 / worker p99 of the same round: {_spread(ratios)}")


def part_first_byte(n_hosts: int, runs: int, per_host: int, client_lines: list[str]) -> None:
    with Fleet(n_hosts + 1) as fleet, SshSite(client_lines) as site:
        sources, cli_host = fleet.hosts[:n_hosts], fleet.hosts[n_hosts]
        for host in sources:
            site.serve(host)
        # per_host > 1: several targets on each host share a connection (and `ssh -G` runs).
        targets = [
            f"ssh://{h.address}?sudo=1&filter=" + ("udp" if i == 0 else f"udp%20port%20{6000 + i}")
            for h in sources
            for i in range(per_host)
        ]
        n_targets = len(targets)
        # Output begins with the first packet: every host sends a few each second meanwhile.
        flows = [fb.Flow(h, cli_host, fb.BASE_PORT + i) for i, h in enumerate(sources)]
        # With --before: its runs and ours in turn.
        clis = [("", fb.DDUMP)] + ([("before: ", BEFORE)] if BEFORE else [])
        count = 40 * runs * len(clis) + 10
        traffic = threading.Thread(target=fb.send, args=(flows, count, 2), daemon=True)
        traffic.start()
        # Its 32 Python senders and sinks start first: else their start-up, not the CLI's,
        # fills the first run (5 s to first byte, against 2 s warm).
        fb.wait_for(
            lambda: all(any("udp-send" in _cmdline(p) for p in h.pids()) for h in sources),
            20,
            "a sender on every host",
        )
        time.sleep(2.0)
        for run, (label, command) in itertools.product(range(runs), clis):
            started = time.monotonic()
            process = cli_host.popen(
                [*command, *targets, "-w", "-"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=site.env,
            )
            assert process.stdout is not None and process.stderr is not None
            capturing: list[float] = []  # when each target said it was capturing

            def watch(
                stderr: IO[bytes] = process.stderr,
                into: list[float] = capturing,
                since: float = started,
            ) -> None:
                for line in stderr:
                    if b": capturing" in line:
                        into.append(time.monotonic() - since)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            ready, _, _ = select.select([process.stdout], [], [], 30)
            took = time.monotonic() - started
            first = os.read(process.stdout.fileno(), 24) if ready else b""
            deadline = time.monotonic() + 20
            while len(capturing) < n_targets and time.monotonic() < deadline:
                time.sleep(0.05)
            process.send_signal(signal.SIGINT)
            process.stdout.read()
            process.wait(20)
            watcher.join(5)
            spread = (
                f"{capturing[0]:.2f} / {fb.percentile(capturing, 0.5):.2f} / {capturing[-1]:.2f}"
                if capturing
                else "none"
            )
            print(f"{label}first byte, {n_hosts} ssh:// hosts x {per_host}, run {run + 1}: "
                  f"{took:.2f} s ({len(first)} bytes); 'capturing' first / median / last: "
                  f"{spread} s ({len(capturing)} targets)", flush=True)  # fmt: skip
        traffic.join(count / 2 + 15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="latency,firstbyte")
    parser.add_argument("--rate", type=int, default=5000, help="datagrams/s per flow")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--hosts", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--per-host", type=int, default=1, help="first byte: targets per host")
    parser.add_argument("--rounds", type=int, default=2, help="latency: runs of each kind")
    parser.add_argument(
        "--kinds", default="worker,ssh", help="latency: worker, ssh, bare, ssh-before"
    )
    parser.add_argument(
        "--before", type=shlex.split, default=[], help="the CLI command of kind ssh-before"
    )
    parser.add_argument(
        "--client-config", action="append", default=[], help="a line for the client's ssh_config"
    )
    args = parser.parse_args()
    # SIGTERM (a timeout) unwinds like Ctrl-C: the fleets and sshd are torn down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    BEFORE[:] = args.before
    parts = args.parts.split(",")
    if "latency" in parts:
        part_latency(
            args.rate, args.seconds, args.rounds, args.kinds.split(","), args.client_config
        )
    if "firstbyte" in parts:
        part_first_byte(args.hosts, args.runs, args.per_host, args.client_config)


if __name__ == "__main__":
    main()
