"""The CLI's CPU per packet with N busy streams, against stand-in workers (no root, no tcpdump).

    .venv/bin/python bench/cli_cost.py [--streams 1,16] [--rate 2000] [--seconds 5]
                                       [--repeat 3] [--before DIR]

A sender process stands in for N workers with direct bodies (X-Ddump-Body: direct): it answers
each capture request with a head and a pcap header, then writes one record to every stream each
1/rate s, each record in its own send, as tcpdump in immediate mode does; it answers
GET /capture/stats with a clean end. The CLI merges the N streams to /dev/null. Printed: the
CLI's CPU per packet (/proc/PID/task/*/schedstat, while the records flow), and the sender's for
scale. Nothing here is a namespace fleet: the figures isolate the CLI's own work per packet,
on loopback. --before DIR runs the CLI of another revision (a copy of its tree, with its built
ddump/_records*.so) alternately, in the same run. Bounded: `--seconds` of traffic per run, at
most 200,000 records per stream.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The repository root must be on the path first.
from bench.cpu_per_packet import on_cpu_ns  # noqa: E402

GLOBAL_HEADER = struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 262144, 276)  # ns, LINUX_SLL2
PACKET = bytes(20) + bytes(80)  # an SLL2 header and 80 bytes: what the merge sees is bytes


def serve(port_file: str, streams: int, rate: int, seconds: float) -> None:
    """The stand-in workers: accept `streams` captures, then feed them; answer stats."""
    listener = socket.create_server(("127.0.0.1", 0))
    Path(port_file).write_text(str(listener.getsockname()[1]))
    captures: list[socket.socket] = []
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    deadline = time.monotonic() + 60
    while len(captures) < streams and time.monotonic() < deadline:
        for _ in selector.select(1):
            client, _ = listener.accept()
            request = client.recv(65536)
            if request.startswith(b"GET /capture/stats"):
                client.sendall(stats_answer())
                client.close()
                continue
            clock = time.time_ns()
            client.sendall(
                b"HTTP/1.1 200 OK\r\nX-Ddump-Body: direct\r\nConnection: close\r\n"
                + f"X-Ddump-Capture: c{len(captures)}\r\nX-Ddump-Clock: {clock}\r\n\r\n".encode()
                + GLOBAL_HEADER
            )
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            captures.append(client)
    print("flowing", flush=True)
    step = 1 / rate
    count = min(int(rate * seconds), 200_000)
    began = next_at = time.monotonic()
    for _ in range(count):
        next_at += step
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        for client in captures:
            now = time.time_ns()
            header = struct.pack("<IIII", now // 10**9, now % 10**9, len(PACKET), len(PACKET))
            client.send(header + PACKET)
    print(f"sent {count * len(captures)} {time.monotonic() - began}", flush=True)
    for client in captures:
        client.close()
    listener.settimeout(5)  # the CLI asks each stream's end
    with contextlib.suppress(OSError):
        for _ in captures:
            client, _ = listener.accept()
            client.recv(65536)
            client.sendall(stats_answer())
            client.close()


def stats_answer() -> bytes:
    body = json.dumps({"running": False, "ended": "clean", "received": 0, "dropped": 0}).encode()
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    return head.encode() + b"\r\n\r\n" + body


def one_run(root: Path, streams: int, rate: int, seconds: float) -> tuple[float, float, float]:
    """(CLI µs per packet, sender µs per packet, packets/s the sender achieved per stream)."""
    port_file = Path(f"/tmp/ddump-cli-cost-{os.getpid()}")
    port_file.unlink(missing_ok=True)
    sender = subprocess.Popen(
        [sys.executable, __file__, "serve", str(port_file), str(streams), str(rate), str(seconds)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for _ in range(100):
            if port_file.exists() and port_file.read_text():
                break
            time.sleep(0.05)
        port = int(port_file.read_text())
        urls = [f"http://127.0.0.1:{port}/capture?filter=port+{i}" for i in range(streams)]
        env = dict(os.environ, PYTHONPATH=str(root))
        cli = subprocess.Popen(
            [sys.executable, "-m", "ddump.cli.main", "-w", "/dev/null", *urls],
            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=root,
        )  # fmt: skip
        assert sender.stdout is not None
        assert sender.stdout.readline().strip() == "flowing"
        time.sleep(0.2)
        cli_before, sender_before = on_cpu_ns(cli.pid), on_cpu_ns(sender.pid)
        sent_line = sender.stdout.readline().strip()
        cli_after, sender_after = on_cpu_ns(cli.pid), on_cpu_ns(sender.pid)
        sent, took = int(sent_line.split()[1]), float(sent_line.split()[2])
        _, stderr = cli.communicate(timeout=60)
        sender.wait(30)
    finally:
        sender.kill()
        port_file.unlink(missing_ok=True)
    written = next(
        (int(line.split()[1]) for line in stderr.splitlines() if " packets written" in line), -1
    )
    if written != sent:
        print(f"# {root}: {written} written of {sent} sent; stderr:\n{stderr}", file=sys.stderr)
    flowing = sent * (took - 0.2) / took  # the packets of the window measured
    return (
        (cli_after - cli_before) / 1000 / flowing,
        (sender_after - sender_before) / 1000 / flowing,
        sent / took / streams,
    )


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1,16")
    parser.add_argument("--rate", type=int, default=2000, help="records/s per stream")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--before", type=Path, help="a copy of the revision to compare with")
    args = parser.parse_args()
    roots = [("after", REPO)] + ([("before", args.before)] if args.before else [])
    print(
        "| code | streams | pkt/s each | achieved pkt/s each | runs | "
        "CLI µs/pkt, median (min..max) | sender µs/pkt |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for streams in [int(s) for s in args.streams.split(",")]:
        results: dict[str, list[tuple[float, float, int]]] = {name: [] for name, _ in roots}
        for _ in range(args.repeat):
            for name, root in roots:
                results[name].append(one_run(root, streams, args.rate, args.seconds))
        for name, _ in roots:
            cli = [r[0] for r in results[name]]
            sender = statistics.median(r[1] for r in results[name])
            achieved = statistics.median(r[2] for r in results[name])
            print(
                f"| {name} | {streams} | {args.rate:,} | {achieved:,.0f} | {len(cli)} | "
                f"{statistics.median(cli):.1f} ({min(cli):.1f}..{max(cli):.1f}) | {sender:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
