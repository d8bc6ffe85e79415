"""How long a worker takes to start N captures at once (time to each response's headers).

N concurrent requests, timed until each response's headers (tcpdump listening). Loopback only;
bounded; stops what it started.

    sudo .venv/bin/python bench/capture_starts.py --captures 1,4,16,64
    sudo .venv/bin/python bench/capture_starts.py --captures 16 --worker-args "--buffer-size 2048"
"""

from __future__ import annotations

import argparse
import http.client
import os
import shlex
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The repository root must be on the path first.
from tests.netns import WorkerProcess, worker_argv  # noqa: E402

HOLD_S = 1.0  # each capture stays open this long after its headers, so all overlap
TIMEOUT_S = 60.0


def start_captures(host: str, port: int, count: int) -> list[float]:
    """Seconds from the start to each response's headers (inf: no answer)."""
    results = [float("inf")] * count
    start = time.monotonic()

    def one(index: int) -> None:
        connection = http.client.HTTPConnection(host, port, timeout=TIMEOUT_S)
        try:
            connection.request("GET", "/capture?filter=udp%20port%205000")
            response = connection.getresponse()
            if response.status == 200:
                results[index] = time.monotonic() - start
            time.sleep(HOLD_S)
        except OSError:
            pass
        finally:
            connection.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S + HOLD_S)
    return sorted(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captures", default="1,4,16,64", help="concurrent captures, per run")
    parser.add_argument("--worker-args", type=shlex.split, default=[], help="ddump-worker options")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root: packet capture")
    print("| concurrent captures | worker options | first / median / last response s |")
    print("|---:|---|---:|")
    for count in (int(n) for n in args.captures.split(",")):
        argv = worker_argv(
            "--listen", "127.0.0.1:0", "--max-captures", str(count), *args.worker_args
        )
        with WorkerProcess(argv) as worker:
            host, port = worker.wait_listening().rsplit(":", 1)
            times = start_captures(host, int(port), count)
            worker.stop()
        options = " ".join(args.worker_args) or "defaults"
        print(
            f"| {count} | {options} | {times[0]:.2f} / {times[len(times) // 2]:.2f} / "
            f"{times[-1]:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
