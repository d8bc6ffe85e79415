"""The processes of a bench/fanin.py run: workers, the CLI, the sender, and their priorities.

Each is started in a session of its own, so that where the kernel groups the CPU by session
(autogroup) every process has a fair share, and a process's nice is its group's; see
`group_nice`. Everything in a namespace is killed with the fleet; the sender (in the root
namespace) by its caller.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The repository root must be on the path first.
from bench.cpu_per_packet import children  # noqa: E402
from bench.fleet import Reader, end_stats, starts, wait_for  # noqa: E402
from tests.netns import Fleet, Host, WorkerProcess, worker_argv  # noqa: E402

WORKER_PORT = 8475
DDUMP = str(REPO / ".venv/bin/ddump")
SENDER = str(REPO / "bench/paced_sender.py")
# The traffic stands for the network: it should come at the offered rate even when what
# captures it is short of CPU, so the sender runs at a higher priority (--sender-nice), and
# so does the thread that reads the CLI's pipe (the latency is the CLI's, not its wait).
SENDER_NICE: list[int] = [-19]


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


CPU_PERIOD_US = 100_000


def cpu_limit(pid: int, cores: float) -> Path | None:
    """Put `pid` in a cgroup of its own that may use `cores` of a CPU (cgroup v2 or v1's cpu
    controller); the group's directory, for remove_cpu_limit (None: no limit asked)."""
    if cores <= 0:
        return None
    quota = int(cores * CPU_PERIOD_US)
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():  # v2
        group = Path(f"/sys/fs/cgroup/ddump-bench-{pid}")
        group.mkdir()
        (group / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
    else:
        group = Path(f"/sys/fs/cgroup/cpu/ddump-bench-{pid}")
        group.mkdir()
        (group / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
        (group / "cpu.cfs_quota_us").write_text(str(quota))
    (group / "cgroup.procs").write_text(str(pid))
    return group


def remove_cpu_limit(group: Path | None) -> None:
    """Remove the group once its processes have exited."""
    if group is not None:
        with contextlib.suppress(OSError):
            group.rmdir()


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
                 nofile: int = 0, nice: int = 0, cores: float = 0.0) -> None:  # fmt: skip
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
        self.cgroup = cpu_limit(self.process.pid, cores)  # a CLI short of CPU, if asked
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
        remove_cpu_limit(self.cgroup)
        self.reader.join(timeout)
        return self.process.returncode

    def log(self) -> str:
        return Path(self.errors.name).read_text(errors="replace")

    def first_byte_s(self) -> float:
        return (self.reader.chunks[0][0] - self.started_ns) / 1e9 if self.reader.chunks else -1


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
