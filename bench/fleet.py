"""End to end on network namespaces: loss against plain tcpdump, latency, CPU; fan-in; a stall.

    sudo .venv/bin/python bench/fleet.py [--parts loss,idle,fanin,stall] [--seconds 5]
                                         [--rates 5000,20000,50000,100000]

Needs root (namespaces, capture), `ip` and tcpdump. Hosts are namespaces made by tests/netns.py
(198.18.S.0/24, a bridge; loopback for the fan-in); everything started runs inside them and is
killed, and the namespaces deleted, on every way out (an exception, Ctrl-C, SIGTERM, the
overall time bound `--max-seconds`). Every run is bounded in packets and in time.

- loss: hosts h1..h3 each run a worker; the CLI runs on h4 and writes to a pipe read here.
  h1->h2, h2->h3, h3->h1 send numbered UDP datagrams (tests/netns.py udp-send) at a third of
  the total rate each, for `--seconds`. Counted: datagrams sent; their copies in the merged
  output (the sender's and the receiver's, by sequence number); what tcpdump says it dropped.
  Then the same traffic with plain `tcpdump -i any -w /dev/null` in h1..h3 instead.
  Latency is the time a record was read from the CLI's pipe minus its capture timestamp (one
  clock: every namespace shares it). CPU is user+system seconds of the worker processes
  (tcpdump excluded) and of the CLI during the traffic, per million packets they passed on.
- idle: only h1->h2 sends; h3's worker captures nothing, so the merge waits --max-delay.
- fanin: four workers on one host's loopback, --max-captures 16 each, one CLI with 64 targets
  (the same capture 16 times from each worker, each time at another 127.0.0.x address, so
  that the CLI opens 64 streams and the workers share one tcpdump each) while traffic flows:
  time to the first byte of output, records per second, peak RSS.
- stall: a client asks h1's worker for a capture and reads nothing for 30 s while h2 sends
  10,000 datagrams/s to h1: the worker's RSS over that time, and the drops tcpdump reports.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import mmap
import os
import re
import select
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from urllib.parse import quote

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The repository root must be on the path first.
from tests.netns import Fleet, Host, WorkerProcess, parse_seq, udp_traffic, worker_argv  # noqa: E402

WORKER_PORT = 8475
BASE_PORT = 5000  # flow i sends to BASE_PORT + i
FILTER = "udp portrange 5000-5099"
SLL2_LEN = 20
PACKET_OUTGOING = 4
CLK_TCK = os.sysconf("SC_CLK_TCK")
RECORD = struct.Struct("<IIII")
PROFILE: Path | None = None  # --profile DIR
SNAPLEN: int | None = None  # --snaplen N
DDUMP = [str(REPO / ".venv/bin/ddump")]  # --ddump CMD
WORKER_EXTRA: list[str] = []  # --worker-args "ARGS"


# ---- processes and what the kernel says about them ----


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (not its children), from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int, key: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise ValueError(f"no {key} for {pid}")


class Reader(threading.Thread):
    """Reads a pipe to its end, keeping each read with the time it returned."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.chunks: list[tuple[int, bytes]] = []

    def run(self) -> None:
        while data := os.read(self.fd, 1 << 20):
            self.chunks.append((time.time_ns(), data))


@dataclass(frozen=True)
class Seen:
    """One record of the merged output."""

    arrival_ns: int  # when the read that completed it returned
    ts_ns: int
    data: bytes  # the packet (LINUX_SLL2)


def merged_records(chunks: list[tuple[int, bytes]]) -> Iterator[Seen]:
    """The records of a pcap read in chunks (a reader of our own, not ddump's parser)."""
    buf = b"".join(data for _, data in chunks)
    ends, total = [], 0
    for arrival, data in chunks:
        total += len(data)
        ends.append((total, arrival))
    if len(buf) < 24:
        return
    magic, linktype = struct.unpack_from("<I16xI", buf)
    assert magic == 0xA1B23C4D and linktype == 276, (hex(magic), linktype)
    pos, index = 24, 0
    while pos + 16 <= len(buf):
        sec, nsec, caplen, _ = RECORD.unpack_from(buf, pos)
        nxt = pos + 16 + caplen
        if nxt > len(buf):
            break
        while ends[index][0] < nxt:
            index += 1
        yield Seen(ends[index][1], sec * 1_000_000_000 + nsec, buf[pos + 16 : nxt])
        pos = nxt


def flow_key(data: bytes) -> tuple[int, bool, int] | None:
    """(destination port, captured outgoing, sequence number) of one of our datagrams."""
    if len(data) < SLL2_LEN + 28 or data[SLL2_LEN] >> 4 != 4:
        return None
    ihl = (data[SLL2_LEN] & 0x0F) * 4
    (port,) = struct.unpack_from(">H", data, SLL2_LEN + ihl + 2)
    seq = parse_seq(data)
    if seq is None:
        return None
    return port, data[10] == PACKET_OUTGOING, seq


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---- the pieces of a run ----


@dataclass(frozen=True)
class Flow:
    src: Host
    dst: Host
    port: int


def send(flows: Sequence[Flow], count: int, rate: int, size: int = 64) -> tuple[float, list[int]]:
    """Every flow sends `count` datagrams at `rate`/s, all at once; (seconds taken, received)."""
    received = [0] * len(flows)
    errors: list[BaseException] = []

    def one(index: int, flow: Flow) -> None:
        try:
            traffic = udp_traffic(
                flow.src, flow.dst, port=flow.port, count=count, rate=rate, size=size
            )
            received[index] = traffic.received or 0
        except BaseException as error:  # reported by the caller
            errors.append(error)

    threads = [threading.Thread(target=one, args=(i, f)) for i, f in enumerate(flows)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.monotonic() - start, received


def ended_lines(worker: WorkerProcess, since: int) -> list[str]:
    """The worker's `capture N end` lines after the first `since` of them."""
    lines = [line for line in worker.log().splitlines() if re.search(r"capture \d+ end", line)]
    return lines[since:]


def starts(worker: WorkerProcess) -> int:
    """How many captures the worker has started."""
    return len(re.findall(r"capture \d+ start", worker.log()))


def end_stats(line: str) -> dict[str, int]:
    return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", line)}


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.02)


class Cli:
    """The real `ddump` on a host, its pcap on a pipe that a Reader drains."""

    def __init__(self, host: Host, targets: list[str], env: dict[str, str], *extra: str) -> None:
        self.started = time.monotonic()
        self.process = host.popen(
            [*DDUMP, "-q", "--filter", FILTER, *extra, *targets, "-w", "-"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env,
        )  # fmt: skip
        assert self.process.stdout is not None
        self.reader = Reader(self.process.stdout.fileno())
        self.reader.start()
        # Peak RSS from the CLI's own VmHWM, sampled while it runs. Not wait4's ru_maxrss: the
        # child is started with vfork, and exec records the parent's peak RSS as the child's,
        # so after the loss parts (this process holds a million records) a 30 MiB CLI
        # "peaked" at 464 and 612 MiB.
        self.peak_mib = 0.0
        self._sampler = threading.Thread(target=self._sample_peak, daemon=True)
        self._sampler.start()

    def _sample_peak(self) -> None:
        while self.process.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.peak_mib = max(self.peak_mib, rss_mib(self.process.pid, "VmHWM"))
            time.sleep(0.05)

    def stop(self, timeout: float = 15) -> tuple[int, float]:
        """Ctrl-C, then its exit status and peak RSS in MiB."""
        self.process.send_signal(signal.SIGINT)
        killer = threading.Timer(timeout, self.process.kill)
        killer.start()
        try:
            self.process.wait()
        finally:
            killer.cancel()
        self._sampler.join(timeout)
        self.reader.join(timeout)
        return self.process.returncode, self.peak_mib


@dataclass
class Step:
    """One traffic run and what came of it."""

    label: str
    rate: int  # offered, all flows together
    sent: int
    seconds: float
    expected: int  # copies that should be captured: the sender's and the receiver's
    captured: int = 0
    dropped: int = 0  # by the kernel, as tcpdump says
    latencies_ms: list[float] = field(default_factory=list)
    worker_cpu_per_m: float = float("nan")
    cli_cpu_per_m: float = float("nan")

    @property
    def lost(self) -> int:
        return self.expected - self.captured

    def row(self) -> str:
        lat = ""
        if self.latencies_ms:
            p50 = percentile(self.latencies_ms, 0.5)
            p99 = percentile(self.latencies_ms, 0.99)
            lat = f"{p50:.1f} / {p99:.1f}"
        cpu = ""
        if self.worker_cpu_per_m == self.worker_cpu_per_m:  # not NaN
            cpu = f"{self.worker_cpu_per_m:.1f} / {self.cli_cpu_per_m:.1f}"
        return (
            f"| {self.label} | {self.rate:,} | {self.sent / self.seconds:,.0f} | {self.expected:,} "
            f"| {self.captured:,} | {self.lost:,} ({100 * self.lost / self.expected:.2f} %) "
            f"| {self.dropped:,} | {lat} | {cpu} |"
        )


STEP_HEADER = (
    "| capture | offered pkt/s | achieved pkt/s | copies expected | in output | lost "
    "| dropped by kernel | latency ms p50 / p99 | CPU s per M packets (workers / CLI) |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def ddump_step(
    fleet: Fleet, workers: list[WorkerProcess], flows: list[Flow], rate: int, seconds: float,
    env: dict[str, str], label: str, max_delay: str = "250ms",
) -> Step:  # fmt: skip
    """The CLI on the last host merging every worker while `flows` send `rate` in total."""
    per_flow = max(1, rate // len(flows))
    count = int(per_flow * seconds)
    query = f"?snaplen={SNAPLEN}" if SNAPLEN else ""
    targets = [
        f"http://{h.address}:{WORKER_PORT}/capture{query}" for h in fleet.hosts[: len(workers)]
    ]
    before = [len(ended_lines(w, 0)) for w in workers]
    started = [starts(w) for w in workers]
    cli = Cli(fleet.hosts[-1], targets, env, "--max-delay", max_delay)
    try:
        wait_for(
            lambda: all(starts(w) > n for w, n in zip(workers, started, strict=True)),
            15, "the captures to start",
        )  # fmt: skip
        time.sleep(0.3)  # the CLI has its pcap headers
        pids = [w.process.pid for w in workers]
        cpu0 = [cpu_seconds(pid) for pid in pids], cpu_seconds(cli.process.pid)
        profilers = profile(PROFILE, f"{rate}-{label}", seconds, cli.process.pid, pids[0])
        took, _ = send(flows, count, per_flow)
        for profiler in profilers:
            profiler.wait(30)
        time.sleep(1.0)  # the tail: max-delay and the pipes
        cpu1 = [cpu_seconds(pid) for pid in pids], cpu_seconds(cli.process.pid)
    finally:
        cli.stop()
    wait_for(
        lambda: all(ended_lines(w, n) for w, n in zip(workers, before, strict=True)),
        15, "the captures to end",
    )  # fmt: skip
    stats = [end_stats(ended_lines(w, n)[0]) for w, n in zip(workers, before, strict=True)]
    step = Step(label, rate, count * len(flows), took, 2 * count * len(flows))
    ports = {f.port for f in flows}
    keys = set()
    timed: list[tuple[int, int, int]] = []  # (port, capture ts, latency ns)
    records = 0
    for seen in merged_records(cli.reader.chunks):
        records += 1
        key = flow_key(seen.data)
        if key is not None and key[0] in ports:
            keys.add(key)
            timed.append((key[0], seen.ts_ns, seen.arrival_ns - seen.ts_ns))
    # Latency counts while every flow sends: at the edges, a host that has not started yet
    # (or has finished) is idle, and holds the others back by --max-delay, as it should.
    first = {port: min(ts for p, ts, _ in timed if p == port) for port in ports}
    last = {port: max(ts for p, ts, _ in timed if p == port) for port in ports}
    low, high = max(first.values()) + 200_000_000, min(last.values()) - 200_000_000
    latencies = [lat / 1e6 for _, ts, lat in timed if low <= ts <= high]
    step.captured = len(keys)
    step.dropped = sum(s.get("dropped", 0) for s in stats)
    step.latencies_ms = latencies
    streamed = sum(s.get("packets", 0) for s in stats)
    worker_cpu = sum(cpu1[0]) - sum(cpu0[0])
    step.worker_cpu_per_m = worker_cpu / max(1, streamed) * 1e6
    step.cli_cpu_per_m = (cpu1[1] - cpu0[1]) / max(1, records) * 1e6
    return step


def tcpdump_step(fleet: Fleet, flows: list[Flow], rate: int, seconds: float, n_hosts: int) -> Step:
    """The same traffic, captured by plain `tcpdump -i any -w /dev/null` on each host."""
    per_flow = max(1, rate // len(flows))
    count = int(per_flow * seconds)
    dumps = []
    for host in fleet.hosts[:n_hosts]:
        dump = host.popen(
            ["tcpdump", "-i", "any", "-n", "-w", "/dev/null", FILTER],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        dumps.append(dump)
        assert dump.stderr is not None
        said = b""
        while b"listening on" not in said:
            ready, _, _ = select.select([dump.stderr], [], [], 10)
            piece = os.read(dump.stderr.fileno(), 4096) if ready else b""
            if not piece:
                raise RuntimeError(f"tcpdump on {host.name} did not start: {said!r}")
            said += piece
    took, _ = send(flows, count, per_flow)
    time.sleep(2.0)  # without --immediate-mode, tcpdump hands over a block after 1 s at most
    step = Step("plain tcpdump", rate, count * len(flows), took, 2 * count * len(flows))
    for dump in dumps:
        dump.send_signal(signal.SIGINT)
        dump.wait(15)  # its statistics fit in the pipe
        assert dump.stderr is not None
        text = dump.stderr.read().decode(errors="replace")
        captured = re.search(r"(\d+) packets? captured", text)
        dropped = re.search(r"(\d+) packets? dropped by kernel", text)
        step.captured += int(captured.group(1)) if captured else 0
        step.dropped += int(dropped.group(1)) if dropped else 0
    return step


def profile(where: Path | None, name: str, seconds: float, *pids: int) -> list[Popen[bytes]]:
    """py-spy on the CLI and a worker while the traffic runs (when asked, and installed)."""
    if where is None:
        return []
    spy = Path(sys.executable).parent / "py-spy"
    where.mkdir(parents=True, exist_ok=True)
    spies = []
    for which, pid in zip(("cli", "worker"), pids, strict=True):
        out = where / f"{name}-{which}.txt"
        argv = [str(spy), "record", "-r", "500", "-f", "raw", "-d", str(int(seconds))]
        argv += ["-p", str(pid), "-o", str(out)]
        spies.append(Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return spies


# ---- the parts ----


def start_workers(hosts: list[Host], env: dict[str, str], *extra: str) -> list[WorkerProcess]:
    workers = []
    for host in hosts:
        worker = WorkerProcess(
            worker_argv("--listen", f":{WORKER_PORT}", *extra, *WORKER_EXTRA), host, env=env
        )
        workers.append(worker)
        worker.wait_listening()
    return workers


def part_loss(rates: list[int], seconds: float, env: dict[str, str]) -> None:
    with Fleet(4) as fleet:
        h1, h2, h3, _ = fleet.hosts
        flows = [Flow(h1, h2, BASE_PORT), Flow(h2, h3, BASE_PORT + 1), Flow(h3, h1, BASE_PORT + 2)]
        workers = start_workers([h1, h2, h3], env)
        try:
            print("\n### Loss, latency and CPU: three busy hosts (h1->h2, h2->h3, h3->h1)\n")
            print(STEP_HEADER, flush=True)
            for rate in rates:
                step = ddump_step(fleet, workers, flows, rate, seconds, env, "ddump")
                print(step.row(), flush=True)
                print(tcpdump_step(fleet, flows, rate, seconds, 3).row(), flush=True)
        finally:
            for worker in workers:
                worker.__exit__()


def part_idle(rate: int, seconds: float, env: dict[str, str]) -> None:
    with Fleet(4) as fleet:
        h1, h2, h3, _ = fleet.hosts
        workers = start_workers([h1, h2, h3], env)
        try:
            print("\n### Latency with one idle host (only h1->h2 sends; h3 sees nothing)\n")
            print(STEP_HEADER, flush=True)
            for max_delay in ("250ms", "50ms"):
                step = ddump_step(
                    fleet, workers, [Flow(h1, h2, BASE_PORT)], rate, seconds, env,
                    f"ddump --max-delay {max_delay}", max_delay,
                )  # fmt: skip
                print(step.row(), flush=True)
        finally:
            for worker in workers:
                worker.__exit__()


def prefault(mib: int) -> None:
    """Touch `mib` MiB of fresh memory and free it (see --prefault-mib)."""
    if mib <= 0:
        return
    size = mib << 20
    with mmap.mmap(-1, size) as area:
        ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(area)), 1, size)


def part_fanin(
    streams: int, rate: int, seconds: float, env: dict[str, str], prefault_mib: int = 0
) -> None:
    per_worker = 16
    n_workers = -(-streams // per_worker)
    with Fleet(1) as fleet:
        (host,) = fleet.hosts
        workers = []
        try:
            for index in range(n_workers):
                worker = WorkerProcess(
                    worker_argv("--listen", f"0.0.0.0:{WORKER_PORT + index}",
                                "--max-captures", str(per_worker), *WORKER_EXTRA),
                    host, env=env,
                )  # fmt: skip
                workers.append(worker)
                worker.wait_listening()
            bpf = quote(f"udp port {BASE_PORT}")
            # The same capture from each worker, under a different loopback address each time:
            # the CLI keeps a target given twice once, the workers share identical captures.
            targets = [
                f"http://127.0.0.{1 + i // n_workers}:{WORKER_PORT + i % n_workers}"
                f"/capture?filter={bpf}"
                for i in range(streams)
            ]
            # Traffic flows before the CLI starts and until it is stopped (bounded: 60 s).
            sender = host.popen(
                [sys.executable, str(REPO / "tests/netns.py"), "udp-send", "127.0.0.1",
                 str(BASE_PORT), str(rate * 60), str(rate), "64", "0"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(0.5)
            prefault(prefault_mib)
            cli = Cli(host, targets, env)
            wait_for(lambda: bool(cli.reader.chunks), 30, "the first byte of output")
            clock_gap = time.time() - time.monotonic()
            ttfb = cli.reader.chunks[0][0] / 1e9 - clock_gap - cli.started
            time.sleep(seconds)
            window_end = time.time_ns()
            code, peak = cli.stop()
            sender.kill()
        finally:
            for worker in workers:
                worker.__exit__()
    seen = list(merged_records(cli.reader.chunks))
    # Steady state: from one second after the first byte to the end of the window.
    start = cli.reader.chunks[0][0] + 1_000_000_000
    steady = [s for s in seen if start <= s.arrival_ns <= window_end]
    span = (window_end - start) / 1e9
    lat = [(s.arrival_ns - s.ts_ns) / 1e6 for s in steady]
    print(f"\n### Fan-in: one CLI, {streams} streams ({n_workers} workers on loopback)\n")
    print("| streams | datagrams/s | time to first byte s | records/s out (steady) "
          "| latency ms p50 / p99 | CLI peak RSS MiB | exit |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {streams} | {rate:,} | {ttfb:.2f} | {len(steady) / span:,.0f} "
        f"| {percentile(lat, 0.5):.1f} / {percentile(lat, 0.99):.1f} | {peak:.1f} | {code} |",
        flush=True,
    )


def part_stall(rate: int, seconds: float, env: dict[str, str]) -> None:
    with Fleet(2) as fleet:
        h1, h2 = fleet.hosts
        (worker,) = start_workers([h1], env)
        client = None
        try:
            pid = worker.process.pid
            time.sleep(0.5)
            idle_rss = rss_mib(pid)
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.settimeout(10)
            client.connect((h1.address, WORKER_PORT))
            query = quote(f"udp port {BASE_PORT}")
            client.sendall(f"GET /capture?filter={query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            worker.wait_log("capture 1 start", 15)
            started_rss = rss_mib(pid)
            samples: list[float] = []
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(0.25):
                    with contextlib.suppress(OSError, ValueError):
                        samples.append(rss_mib(pid))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            count = int(rate * seconds)
            took, _ = send([Flow(h2, h1, BASE_PORT)], count, rate)
            stop.set()
            sampler.join()
            client.close()
            client = None
            line = worker.wait_log("capture 1 end", 15)
        finally:
            if client is not None:
                client.close()
            worker.__exit__()
    stats = end_stats(line)
    print(f"\n### Worker under a stalled client ({seconds:g} s, {rate:,} pkt/s offered)\n")
    print("| sent | achieved pkt/s | worker RSS MiB: idle / capture start / max | growth "
          "| tcpdump captured / dropped by kernel | streamed to the client |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|")
    top = max(samples) if samples else float("nan")
    print(
        f"| {count:,} | {count / took:,.0f} | {idle_rss:.1f} / {started_rss:.1f} / {top:.1f} "
        f"| {top - started_rss:+.1f} MiB | {stats.get('captured', '?')} / "
        f"{stats.get('dropped', '?')} | {stats.get('packets', '?')} packets |",
        flush=True,
    )


def bounded_as_root(max_seconds: int) -> None:
    """Exit unless root; end the run (cleanups included) on SIGTERM or after `max_seconds`."""
    if os.geteuid() != 0:
        sys.exit("needs root: network namespaces and packet capture")

    def bail(signum: int, _frame: object) -> None:
        raise SystemExit(f"stopped by {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, bail)
    signal.signal(signal.SIGALRM, bail)
    signal.alarm(max_seconds)


def main() -> None:
    global PROFILE, SNAPLEN, DDUMP
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="loss,idle,fanin,stall")
    parser.add_argument("--rates", default="5000,20000,50000,100000", help="total pkt/s")
    parser.add_argument("--seconds", type=float, default=5.0, help="traffic per step")
    parser.add_argument("--idle-rate", type=int, default=2000)
    parser.add_argument("--fanin-streams", type=int, default=64)
    parser.add_argument("--fanin-rate", type=int, default=50, help="datagrams/s on loopback")
    parser.add_argument(
        "--prefault-mib",
        type=int,
        default=0,
        help="fan-in: touch and free this much memory just before the CLI starts (a diagnosis:"
        " see BENCHMARKS.md, Fan-in)",
    )
    parser.add_argument("--stall-seconds", type=float, default=30.0)
    parser.add_argument("--stall-rate", type=int, default=10_000)
    parser.add_argument("--max-seconds", type=int, default=1800, help="bound on the whole run")
    parser.add_argument("--profile", type=Path, help="py-spy the CLI and a worker, into DIR")
    parser.add_argument("--snaplen", type=int, help="ask the workers for this snapshot length")
    parser.add_argument("--ddump", type=shlex.split, default=DDUMP, help="the CLI command to run")
    parser.add_argument(
        "--worker-args", type=shlex.split, default=[], help="more ddump-worker options"
    )
    args = parser.parse_args()
    PROFILE, SNAPLEN, DDUMP = args.profile, args.snaplen, args.ddump
    WORKER_EXTRA[:] = args.worker_args
    bounded_as_root(args.max_seconds)
    with tempfile.TemporaryDirectory(prefix="ddump-fleet-") as tmp:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        env["PYTHONPATH"] = str(REPO)
        parts = args.parts.split(",")
        if "loss" in parts:
            part_loss([int(r) for r in args.rates.split(",")], args.seconds, env)
        if "idle" in parts:
            part_idle(args.idle_rate, args.seconds, env)
        if "fanin" in parts:
            part_fanin(args.fanin_streams, args.fanin_rate, args.seconds, env, args.prefault_mib)
        if "stall" in parts:
            part_stall(args.stall_rate, args.stall_seconds, env)


if __name__ == "__main__":
    main()
