"""The CPU one wakeup costs a process here, by how long it slept before it (no root).

    .venv/bin/python bench/wakeup_cost.py [--periods 0.5,2,8,20] [--seconds 1.5] [--repeat 3]

Each kind of process does nothing but sleep `period` in the kernel and wake, for `--seconds`;
its CPU per wakeup is its own CPU time (CLOCK_PROCESS_CPUTIME_ID) divided by the wakeups:

- C: epoll_wait in a loop (built with the system's `cc` when there is one): the floor, what a
  small C program such as tcpdump pays to be woken;
- Python: `select.epoll().poll(period)` in a loop;
- asyncio: `await asyncio.sleep(period)`: the CLI's event loop, with nothing to do.

Why: with one capture, each packet (or each pacing turn of several) is a wakeup of the CLI,
and CLI / tcpdump CPU per packet is then mostly the ratio of what their wakeups cost. Each kind
runs in a process of its own, the kinds in turn; medians of `--repeat` runs. Bounded: the
whole run is kinds x periods x repeat x seconds.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

C_SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <sys/epoll.h>
int main(int argc, char **argv) {
    int period_us = atoi(argv[1]), count = atoi(argv[2]);
    int ep = epoll_create1(0);
    struct epoll_event event;
    struct timespec a, b, wait = {period_us / 1000000, (period_us % 1000000) * 1000L};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &a);
    for (int i = 0; i < count; i++)
        epoll_pwait2(ep, &event, 1, &wait, NULL);  /* epoll_wait takes whole ms */
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &b);
    printf("%f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / 1e3 / count);
    return 0;
}
"""

PYTHON_EPOLL = """
import select, sys, time
period, count = float(sys.argv[1]), int(sys.argv[2])
ep = select.epoll()
begin = time.process_time()
for _ in range(count):
    ep.poll(period)
print((time.process_time() - begin) / count * 1e6)
"""

ASYNCIO = """
import asyncio, sys, time
period, count = float(sys.argv[1]), int(sys.argv[2])
async def main():
    begin = time.process_time()
    for _ in range(count):
        await asyncio.sleep(period)
    print((time.process_time() - begin) / count * 1e6)
asyncio.run(main())
"""


def build_c(directory: Path) -> Path | None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    source, binary = directory / "wake.c", directory / "wake"
    source.write_text(C_SOURCE)
    built = subprocess.run([cc, "-O2", "-o", str(binary), str(source)], capture_output=True)
    return binary if built.returncode == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--periods", default="0.5,2,8,20", help="ms")
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    periods = [float(p) for p in args.periods.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        binary = build_c(Path(tmp))
        kinds: list[tuple[str, list[str], bool]] = []  # name, argv, period in µs (C)
        if binary is not None:
            kinds.append(("C (epoll_pwait2)", [str(binary)], True))
        kinds.append(("Python (epoll.poll)", [sys.executable, "-c", PYTHON_EPOLL], False))
        kinds.append(("asyncio (sleep)", [sys.executable, "-c", ASYNCIO], False))
        print("| kind | " + " | ".join(f"{p:g} ms" for p in periods) + " |")
        print("|---|" + "---:|" * len(periods))
        results: dict[str, list[list[float]]] = {
            name: [[] for _ in periods] for name, _, _ in kinds
        }
        for _ in range(args.repeat):
            for index, period in enumerate(periods):
                count = max(10, int(args.seconds * 1000 / period))
                for name, argv, micro in kinds:
                    when = str(int(period * 1000)) if micro else str(period / 1000)
                    out = subprocess.run(
                        [*argv, when, str(count)], capture_output=True, text=True, timeout=120
                    )
                    results[name][index].append(float(out.stdout))
        for name, _, _ in kinds:
            cells = [
                f"{statistics.median(r):.0f} ({min(r):.0f}..{max(r):.0f})" for r in results[name]
            ]
            print(f"| {name} | " + " | ".join(cells) + " |")
        print(f"\nCPU µs per wakeup, median (min..max) of {args.repeat} runs", flush=True)


if __name__ == "__main__":
    main()
