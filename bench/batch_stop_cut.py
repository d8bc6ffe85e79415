"""Where a stop cuts a `--batch` capture: the last packet written against the moment of the stop.

Two hosts in network namespaces (one clock: every offset is truly 0); host 2 sends numbered UDP
datagrams to host 1 at 2,000 a second (one every 0.5 ms); ddump --batch captures on host 1 and
gets SIGINT 1.5 s into the traffic. Prints, per run, the worker's clock offset as the CLI
estimated it from the answer, and the last written packet's timestamp minus the time the SIGINT
was sent (the CLI takes the stop's time when it handles the signal: a little later). Bounded:
each run sends at most 8,000 datagrams and lasts about 5 s.

    sudo .venv/bin/python bench/batch_stop_cut.py --runs 6
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The repository root must be on the path first.
from ddump.pcap import PcapStreamParser  # noqa: E402
from tests.netns import Fleet, WorkerProcess, _script, parse_seq, worker_argv  # noqa: E402

PORT = 5009


def one_run(address: str, sender_host: object, out: Path) -> str:
    url = f"http://{address}:8475/capture?filter=udp%20and%20dst%20port%20{PORT}"
    cli = subprocess.Popen(
        [sys.executable, "-m", "ddump.cli.main", "--batch", "-w", str(out), url],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.5)
        sender = sender_host.popen(_script("udp-send", address, PORT, 8000, 2000, 64, 4009))  # type: ignore[attr-defined]
        time.sleep(1.5)
        stop_ns = time.time_ns()
        cli.send_signal(signal.SIGINT)
        _, err = cli.communicate(timeout=20)
        sender.wait(10)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    records = PcapStreamParser().feed(out.read_bytes())
    seqs = [parse_seq(data) for _, data in records]
    complete = seqs == list(range(len(seqs)))
    offset = next((line for line in err.splitlines() if "clock offset" in line), "")
    offset = offset.split("clock offset")[-1].strip(" )")
    if not records:
        return f"no packet written (the sender may have started late); stderr:\n{err}"
    last_ms = (records[-1][0] - stop_ns) / 1e6
    return (
        f"clock offset {offset}, {len(records)} packets, none missing: {complete}, "
        f"last written - stop = {last_ms:+.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory, Fleet(2) as fleet:
        receiver, sender = fleet.hosts
        with WorkerProcess(worker_argv("--listen", ":8475"), receiver) as worker:
            worker.wait_listening()
            for run in range(min(args.runs, 50)):
                out = Path(directory) / f"cut{run}.pcap"
                print(f"run {run}: {one_run(receiver.address, sender, out)}", flush=True)


if __name__ == "__main__":
    main()
