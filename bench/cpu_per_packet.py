"""CPU per packet of one live capture: tcpdump, the worker relaying it, the CLI merging it.

    sudo .venv/bin/python bench/cpu_per_packet.py [--rates 500,2000,10000] [--seconds 6]
                                                  [--before DIR] [--profile DIR]

One namespace (tests/netns.py), traffic on its loopback only: a sender paces numbered UDP
datagrams one at a time (timer slack 1 us, so at 10,000/s they are ~100 us apart, not in
bursts), and a worker captures them in immediate mode for a CLI that writes to a pipe read
here. For each rate: the on-CPU time of tcpdump (the worker's child), of the worker and of the
CLI while the traffic runs, divided by the records in the CLI's output; and their latency
(read from the pipe minus capture time; one clock).

CPU is each process's sum_exec_runtime over its threads (/proc/PID/task/*/schedstat: ns, not
the 10 ms ticks of /proc/PID/stat, which would be a few ticks per run at 500/s).

--before DIR runs the same steps first with the worker and the CLI from DIR (a copy of another
revision, e.g. `git archive REV | tar -x -C DIR` plus the built ddump/_records*.so), so both
are measured side by side in one run. Last, for scale: the CPU per wakeup of an asyncio loop
that does nothing but read a pipe written at the same rate. --profile DIR writes py-spy flame
data of the worker and the CLI per step (py-spy in the venv). Bounded: `--seconds` of traffic
per step, a count per step, and `--max-seconds` for the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The repository root must be on the path first.
from bench.fleet import Reader, merged_records, percentile, wait_for  # noqa: E402
from tests.netns import Fleet, Host, WorkerProcess, payload, worker_argv  # noqa: E402

PORT = 5000
WORKER_PORT = 8475
FILTER = f"udp port {PORT}"
PR_SET_TIMERSLACK = 29


def on_cpu_ns(pid: int) -> int:
    """Time on a CPU of every thread of `pid` so far, in ns (threads that ended are lost)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


def children(pid: int) -> list[int]:
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            found += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    return found


def send_paced(count: int, rate: int) -> None:
    """`count` datagrams to 127.0.0.1:PORT, each at its own time (runs inside the namespace)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)  # sleeps end within ~1 us, not 50
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", PORT))  # a bound port: no ICMP unreachable; a full buffer drops
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    start = time.monotonic()
    for seq in range(count):
        ahead = start + seq / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
        sock.sendto(payload(seq), ("127.0.0.1", PORT))
    sink.close()


def floor_us(rate: int, seconds: float) -> float:
    """CPU per wakeup of an asyncio process that only reads a pipe written `rate` times a
    second, one packet-sized write each: what any Python event loop pays per wakeup here."""
    read_fd, write_fd = os.pipe()
    count = int(rate * seconds)
    pid = os.fork()
    if pid == 0:  # the writer, paced like send_paced
        os.close(read_fd)
        ctypes.CDLL(None).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
        start = time.monotonic()
        for seq in range(count):
            ahead = start + seq / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            os.write(write_fd, payload(seq, 100))
        os._exit(0)
    os.close(write_fd)
    os.set_blocking(read_fd, False)
    wakeups = 0

    async def read_all() -> None:
        nonlocal wakeups
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def readable() -> None:
            nonlocal wakeups
            if os.read(read_fd, 65536):
                wakeups += 1
            else:
                loop.remove_reader(read_fd)
                done.set_result(None)

        loop.add_reader(read_fd, readable)
        await done

    before = on_cpu_ns(os.getpid())
    asyncio.run(read_all())
    used = on_cpu_ns(os.getpid()) - before
    os.waitpid(pid, 0)
    os.close(read_fd)
    return used / 1000 / max(1, wakeups)


@dataclass(frozen=True)
class Row:
    variant: str
    rate: int
    packets: int
    achieved: float
    tcpdump_us: float
    worker_us: float
    cli_us: float
    p50_ms: float
    p99_ms: float

    def line(self) -> str:
        return (
            f"| {self.variant} | {self.rate:,} | {self.achieved:,.0f} | {self.packets:,} "
            f"| {self.tcpdump_us:.1f} | {self.worker_us:.1f} "
            f"({self.worker_us / self.tcpdump_us:.2f}x) | {self.cli_us:.1f} "
            f"({self.cli_us / self.tcpdump_us:.2f}x) | {self.p50_ms:.2f} / {self.p99_ms:.2f} |"
        )


HEADER = (
    "| code | offered pkt/s | achieved pkt/s | packets | tcpdump us/pkt | worker us/pkt "
    "(x tcpdump) | CLI us/pkt (x tcpdump) | latency ms p50 / p99 |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|"
)


def profile(where: Path | None, name: str, seconds: float, pids: dict[str, int]) -> list[Any]:
    if where is None:
        return []
    spy = Path(sys.executable).parent / "py-spy"
    where.mkdir(parents=True, exist_ok=True)
    spies = []
    for which, pid in pids.items():
        out = where / f"{name}-{which}.txt"
        argv = [str(spy), "record", "-r", "200", "-f", "raw", "-d", str(int(seconds))]
        argv += ["-p", str(pid), "-o", str(out)]
        spies.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return spies


def step(
    host: Host, env: dict[str, str], variant: str, rate: int, seconds: float, spy: Path | None
) -> Row:
    worker = WorkerProcess(worker_argv("--listen", f"127.0.0.1:{WORKER_PORT}"), host, env=env)
    with worker:
        worker.wait_listening()
        cli = host.popen(
            [str(REPO / ".venv/bin/ddump"), "-q", "--filter", FILTER,
             f"http://127.0.0.1:{WORKER_PORT}/capture", "-w", "-"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env,
        )  # fmt: skip
        assert cli.stdout is not None
        reader = Reader(cli.stdout.fileno())
        reader.start()
        try:
            wait_for(lambda: "capture 1 start" in worker.log(), 15, "the capture to start")
            time.sleep(0.5)  # the CLI has its header; start-up CPU is not counted
            dumps = children(worker.process.pid)
            assert len(dumps) == 1, dumps
            pids = {"tcpdump": dumps[0], "worker": worker.process.pid, "cli": cli.pid}
            before = {name: on_cpu_ns(pid) for name, pid in pids.items()}
            count = int(rate * seconds)
            spies = profile(
                spy, f"{variant}-{rate}", seconds, {"worker": pids["worker"], "cli": pids["cli"]}
            )
            began = time.monotonic()
            host.run([sys.executable, __file__, "send", str(count), str(rate)],
                     timeout=seconds * 3 + 10)  # fmt: skip
            took = time.monotonic() - began
            time.sleep(0.5)  # the tail: the pipes and the merge
            after = {name: on_cpu_ns(pid) for name, pid in pids.items()}
            for process in spies:
                process.wait(30)
        finally:
            cli.send_signal(signal.SIGINT)
            try:
                cli.wait(15)
            except subprocess.TimeoutExpired:
                cli.kill()
                cli.wait()
            reader.join(15)
    records = list(merged_records(reader.chunks))
    # Latency while the traffic flows, not of the first packets after a quiet start.
    latencies = [(seen.arrival_ns - seen.ts_ns) / 1e6 for seen in records[rate // 10 :]]
    used = {name: (after[name] - before[name]) / 1000 / max(1, len(records)) for name in pids}
    return Row(
        variant, rate, len(records), count / took, used["tcpdump"], used["worker"],
        used["cli"], percentile(latencies, 0.5), percentile(latencies, 0.99),
    )  # fmt: skip


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "send":
        send_paced(int(sys.argv[2]), int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="500,2000,10000")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--before", type=Path, help="a copy of the revision to compare with")
    parser.add_argument("--profile", type=Path, help="py-spy output directory")
    parser.add_argument("--repeat", type=int, default=1, help="runs per rate and code")
    parser.add_argument("--max-seconds", type=float, default=900.0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces, capture)")
    rates = [int(r) for r in args.rates.split(",")]
    if args.seconds * max(rates) > 200_000:
        sys.exit("at most 200,000 packets per step")
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("max-seconds")))
    signal.alarm(int(args.max_seconds))
    variants = [("after", REPO)]
    if args.before is not None:
        variants.insert(0, ("before", args.before.resolve()))
    rows = []
    floors: list[tuple[int, float]] = []
    with Fleet(1) as fleet:
        host = fleet.hosts[0]
        for rate in rates:
            runs: dict[str, list[Row]] = {variant: [] for variant, _ in variants}
            for repeat in range(args.repeat):
                # Alternating, so that both see the same machine, and in turn first (the
                # second of a pair measured consistently higher, for the same code).
                for variant, root in variants[:: -1 if repeat % 2 else 1]:
                    env = dict(os.environ, PYTHONPATH=str(root))
                    row = step(host, env, variant, rate, args.seconds, args.profile)
                    print(row.line(), flush=True)
                    runs[variant].append(row)
            rows += [median_row(runs[variant]) for variant, _ in variants]
            floors.append((rate, floor_us(rate, min(args.seconds, 4.0))))
    print(f"\nmedians of {args.repeat} runs each:\n{HEADER}")
    for row in rows:
        print(row.line())
    print("\nan asyncio loop that only reads one pipe write per wakeup, same rate:")
    for rate, used in floors:
        print(f"| {rate:,} pkt/s | {used:.1f} us CPU per wakeup |")


def median_row(runs: list[Row]) -> Row:
    """Each column's median over the runs (on a shared machine, one run can be unlucky)."""

    def mid(values: list[float]) -> float:
        return statistics.median(values)

    first = runs[0]
    return Row(
        first.variant, first.rate, int(mid([r.packets for r in runs])),
        mid([r.achieved for r in runs]), mid([r.tcpdump_us for r in runs]),
        mid([r.worker_us for r in runs]), mid([r.cli_us for r in runs]),
        mid([r.p50_ms for r in runs]), mid([r.p99_ms for r in runs]),
    )  # fmt: skip


if __name__ == "__main__":
    main()
