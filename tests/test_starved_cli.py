"""A CLI short of CPU still writes every record in order.

A live stream that sent nothing for --max-delay is taken to have nothing older on its way. A
CLI that is not given the CPU (here: stopped 150 ms of every 180 with SIGSTOP, while stand-in
workers keep sending) finds records waiting in its own sockets that are older than that: they
must hold the others back until read, not be written late (ddump/cli/unread.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from ddump.pcap import PcapStreamParser
from tests.conftest import require_tool
from tests.fake_worker import pcap_stream, read_request, sll2_packet

STREAMS = 8
RATE = 500  # records/s per stream, each in its own send, as tcpdump -U writes them
RECORDS = 1_000  # per stream: 2 s
STOPPED_S, RUNNING_S = 0.15, 0.03


class PacedWorkers:
    """Stands in for STREAMS direct captures on one port: each gets RECORDS records, paced at
    RATE; GET /capture/stats says each ended cleanly."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.flowing = threading.Event()
        self.sent = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        captures: list[socket.socket] = []
        while len(captures) < STREAMS:
            client, _ = self.listener.accept()
            request = read_request(client) or b""
            if request.startswith(b"GET /capture/stats"):
                self._stats(client)
                continue
            client.sendall(
                b"HTTP/1.1 200 OK\r\nX-Ddump-Body: direct\r\nConnection: close\r\n"
                + f"X-Ddump-Capture: c{len(captures)}\r\n".encode()
                + f"X-Ddump-Clock: {time.time_ns()}\r\n\r\n".encode()
                + pcap_stream([])
            )
            captures.append(client)
        self.flowing.set()
        began = time.monotonic()
        for n in range(RECORDS):
            delay = began + n / RATE - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            for stream, client in enumerate(captures):
                packet = sll2_packet(b"\x45" + struct.pack(">HI", stream, n) + bytes(13))
                client.sendall(pcap_stream([(time.time_ns(), packet)])[24:])  # no header
        for client in captures:
            client.close()
        self.sent.set()
        self.listener.settimeout(30)
        try:
            for _ in captures:
                client, _ = self.listener.accept()
                read_request(client)
                self._stats(client)
        except OSError:
            pass

    @staticmethod
    def _stats(client: socket.socket) -> None:
        body = json.dumps({"running": False, "ended": "clean", "received": 0, "dropped": 0})
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
        client.sendall(head.encode() + b"\r\n\r\n" + body.encode())
        client.close()

    def close(self) -> None:
        self.listener.close()


def test_a_cli_short_of_cpu_writes_no_record_late(tmp_path: Path) -> None:
    capinfos = require_tool("capinfos")
    out = tmp_path / "out.pcap"
    workers = PacedWorkers()
    urls = [
        f"http://127.0.0.1:{workers.port}/capture?filter=port+{i}&count={RECORDS}"
        for i in range(STREAMS)
    ]
    cli = subprocess.Popen(
        [sys.executable, "-m", "ddump.cli.main", "--max-delay", "50ms", "-w", str(out), *urls],
        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert workers.flowing.wait(30), "the CLI did not open every capture"
        deadline = time.monotonic() + 30
        while not workers.sent.is_set() and time.monotonic() < deadline:
            os.kill(cli.pid, signal.SIGSTOP)
            try:
                time.sleep(STOPPED_S)
            finally:
                os.kill(cli.pid, signal.SIGCONT)
            time.sleep(RUNNING_S)
        _, stderr = cli.communicate(timeout=60)
    finally:
        cli.kill()
        workers.close()
    assert cli.returncode == 0, stderr
    assert f"{STREAMS * RECORDS} packets written\n" in stderr, stderr
    assert "late" not in stderr
    seen = [
        struct.unpack(">HI", data[-19:-13]) for _, data in PcapStreamParser().feed(out.read_bytes())
    ]
    assert sorted(seen) == [(s, n) for s in range(STREAMS) for n in range(RECORDS)]
    info = subprocess.run([capinfos, "-o", str(out)], capture_output=True, text=True, timeout=60)
    assert "Strict time order:   True" in info.stdout, info.stdout
