"""Merge throughput: `ddump FILES -w -` against `mergecap -F nsecpcap -w - FILES`.

    .venv/bin/python bench/merge_vs_mergecap.py [--runs 5] [--cases imix4,small4,imix64]

For each case, synthetic captures are written by make_pcaps.py (LINUX_SLL2, nanosecond, finely
interleaved timestamps), then both commands run in turn (ddump, mergecap, ddump, ...) with
their output going to /dev/null; each whole process is timed from start to exit, with its CPU
time and peak RSS from wait4(). One warm-up run of each is not counted (it also puts the files
in the page cache). Reported: medians of the runs, as packets per second, and the ratio of
ddump's speed to mergecap's (mergecap's time / ddump's, above 1.0: ddump is faster) as the
median over the pairs of runs, so that a machine slowing down between pairs cancels out. Then
both merge once more into files, which are compared record by record (compare_pcaps.py).
A third command runs in the same rotation: walk_floor.py, a Python process that only steps
over the record headers: what any pure-Python merge costs at the least.

ddump runs with its bytecode cached (PYTHONPYCACHEPREFIX in the work directory), as it is when
installed from a package: without a cache every run would compile its modules first.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Case:
    name: str
    streams: int
    packets: int  # per stream
    sizes: str
    what: str
    shape: str = "interleaved"


CASES = {
    "imix4": Case("imix4", 4, 250_000, "imix", "4 streams x 250,000 packets, IMIX 64/594/1500"),
    "small4": Case("small4", 4, 250_000, "64", "4 streams x 250,000 packets, 64 bytes"),
    "imix64": Case("imix64", 64, 15_625, "imix", "64 streams x 15,625 packets, IMIX"),
    "rotated120": Case(
        "rotated120", 120, 8_000, "64", "120 rotated files x 8,000, 64 bytes", "rotated"
    ),
    "uneven60": Case(
        "uneven60", 60, 8_000, "64", "60 files, 1x to 60x rates, 480,000 in all", "uneven"
    ),
    "files1000": Case("files1000", 1000, 500, "imix", "1,000 files x 500, IMIX", "uneven"),
}
TIMEOUT_S = 300


@dataclass(frozen=True)
class Run:
    wall_s: float
    cpu_s: float
    rss_mib: float


def timed(argv: list[str], env: dict[str, str], timeout: float) -> Run:
    """Run to completion with stdout on /dev/null; wall time, CPU time and peak RSS (wait4)."""
    with open(os.devnull, "wb") as null, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        process = subprocess.Popen(argv, stdout=null, stderr=err, env=env)
        killer = threading.Timer(timeout, process.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            killer.cancel()
        wall = time.perf_counter() - start
        process.returncode = code = os.waitstatus_to_exitcode(status)
        if code != 0:
            err.seek(0)
            raise SystemExit(f"exit {code}: {' '.join(argv)}\n{err.read().decode()}")
    return Run(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


def ddump_argv() -> list[str]:
    script = Path(sys.executable).parent / "ddump"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ddump.cli.main"]


@dataclass(frozen=True)
class Result:
    case: Case
    runs: dict[str, list[Run]]  # per command, in the order they ran
    check: str  # what compare_pcaps.py found

    def median(self, command: str, field: str) -> float:
        return float(statistics.median(getattr(run, field) for run in self.runs[command]))

    def ratio(self, field: str, command: str = "ddump") -> float:
        """Median of mergecap / command over the pairs of runs: drift between pairs cancels out."""
        pairs = zip(self.runs["mergecap"], self.runs[command], strict=True)
        return float(statistics.median(getattr(m, field) / getattr(d, field) for m, d in pairs))

    def row(self) -> str:
        """One Markdown table row (see HEADER)."""
        total = self.case.streams * self.case.packets
        wall = {name: self.median(name, "wall_s") for name in self.runs}
        cpu = {name: self.median(name, "cpu_s") for name in self.runs}
        rss = {name: self.median(name, "rss_mib") for name in self.runs}
        return (
            f"| {self.case.what} | {total / wall['ddump']:,.0f} | {total / wall['mergecap']:,.0f} "
            f"| **{self.ratio('wall_s'):.2f}** ({self.ratio('cpu_s'):.2f}) "
            f"| {wall['ddump']:.3f} / {wall['mergecap']:.3f} "
            f"| {cpu['ddump']:.3f} / {cpu['mergecap']:.3f} "
            f"| {rss['ddump']:.0f} / {rss['mergecap']:.0f} "
            f"| {self.ratio('wall_s', 'floor'):.2f} ({wall['floor']:.3f} s) "
            f"| {self.check} |"
        )


HEADER = (
    "| case | ddump pkt/s | mergecap pkt/s | ratio wall (CPU) | wall s, median (ddump / mergecap) "
    "| CPU s | peak RSS MiB | floor: walk only, ratio (wall) | outputs |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---|"
)


def bench_case(
    case: Case, workdir: Path, runs: int, env: dict[str, str], ddump: list[str]
) -> Result:
    """Generate the case's files, time both commands in turn, compare their outputs.

    Generating and comparing run in child processes: a child forked from a big parent would
    count the parent's memory in its own peak RSS.
    """
    data = workdir / case.name
    make = [sys.executable, str(HERE / "make_pcaps.py"), str(data), "--streams", str(case.streams)]
    make += ["--packets", str(case.packets), "--sizes", case.sizes, "--shape", case.shape]
    subprocess.run(make, check=True, timeout=TIMEOUT_S)
    os.sync()  # the files' write-back must not compete with the timed runs
    files = sorted(str(p) for p in data.glob("*.pcap"))

    def argv(command: str, out: str) -> list[str]:
        if command == "ddump":
            return [*ddump, "-q", *files, "-w", out]
        if command == "floor":
            return [sys.executable, str(HERE / "walk_floor.py"), *files]
        return ["mergecap", "-F", "nsecpcap", "-w", out, *files]

    commands = ("ddump", "mergecap", "floor")
    for command in commands:  # warm-up, not counted: page cache, bytecode cache
        timed(argv(command, "-"), env, TIMEOUT_S)
    results: dict[str, list[Run]] = {command: [] for command in commands}
    for _ in range(runs):
        for command in commands:
            results[command].append(timed(argv(command, "-"), env, TIMEOUT_S))

    outputs = [str(workdir / f"{case.name}.{command}.pcap") for command in commands[:2]]
    for command, out in zip(commands[:2], outputs, strict=True):
        subprocess.run(argv(command, out), env=env, check=True, timeout=TIMEOUT_S)
    check = subprocess.run(
        [sys.executable, str(HERE / "compare_pcaps.py"), *outputs],
        capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    shutil.rmtree(data)
    for out in outputs:
        os.unlink(out)
    found = " ".join(check.stdout.split())  # a difference is reported as "DIFFERENT: ..."
    return Result(case, results, f"identical: {found}" if check.returncode == 0 else found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each (>= 5)")
    parser.add_argument(
        "--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES)
    )
    parser.add_argument("--workdir", type=Path, help="default: a temporary directory")
    parser.add_argument(
        "--ddump", type=shlex.split, default=ddump_argv(), help="the command to test (a checkout)"
    )
    args = parser.parse_args()
    if args.runs < 5:
        parser.error("--runs must be at least 5 (the median of fewer says little)")
    if shutil.which("mergecap") is None:
        sys.exit("mergecap is missing: apt-get install wireshark-common")
    # SIGTERM unwinds like Ctrl-C, so the work directory (gigabytes) is always removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by SIGTERM"))
    workdir = Path(tempfile.mkdtemp(prefix="ddump-bench-", dir=args.workdir))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(workdir / "pycache")
    try:
        print(HEADER, flush=True)
        for name in args.cases.split(","):
            print(bench_case(CASES[name], workdir, args.runs, env, args.ddump).row(), flush=True)
        floor = timed(["true"], env, TIMEOUT_S).rss_mib
        print(f"\nPeak RSS cannot read below this script's own ({floor:.0f} MiB): see wait4(2).")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
