"""Three hosts in network namespaces, a real worker on each, the real CLI merging them all."""

from __future__ import annotations

import collections
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from ddump.pcap import LINKTYPE_LINUX_SLL2, PcapHeader, PcapStreamParser
from tests.conftest import require_root, require_tool
from tests.netns import Fleet, Host, WorkerProcess, parse_seq, udp_traffic, worker_argv

PORT = 8475
SLL2_LEN = 20
PACKET_OUTGOING = 4


@dataclass
class Workers:
    fleet: Fleet
    workers: list[WorkerProcess]

    def url(self, index: int, bpf: str = "udp") -> str:
        address = self.fleet.hosts[index].address
        return f"http://{address}:{PORT}/capture?filter={quote(bpf)}"


@pytest.fixture
def fleet() -> Iterator[Workers]:
    require_root()
    require_tool("ip")
    require_tool("tcpdump")
    with Fleet(3) as fleet:
        workers = [WorkerProcess(worker_argv("--listen", f":{PORT}"), host) for host in fleet.hosts]
        try:
            for worker in workers:
                worker.wait_listening()
            yield Workers(fleet, workers)
        finally:
            for worker in workers:
                worker.__exit__()


class Cli:
    """The real `ddump` in the root namespace, writing a pcap file."""

    def __init__(self, args: list[str], out: Path) -> None:
        self.out = out
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ddump.cli.main", "-w", str(out), *args],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr = ""

    def wait_capturing(self, workers: Workers, n: int, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        for worker in workers.workers[:n]:
            worker.wait_log("start:", max(0.1, deadline - time.monotonic()))
        time.sleep(0.3)  # tcpdump is listening once the worker answered

    def finish(self, signum: int | None = signal.SIGINT, timeout: float = 20) -> int:
        if signum is not None and self.process.poll() is None:
            self.process.send_signal(signum)
        _, self.stderr = self.process.communicate(timeout=timeout)
        return self.process.returncode

    def records(self) -> list[tuple[int, bytes]]:
        data = self.out.read_bytes()
        parser = PcapStreamParser()
        records = parser.feed(data)
        parser.close()
        assert parser.header is not None
        assert parser.header.linktype == LINKTYPE_LINUX_SLL2
        return records


def flows(records: list[tuple[int, bytes]]) -> dict[tuple[bytes, int], list[tuple[int, int]]]:
    """(udp src/dst ports, seq) -> [(timestamp, sll2 packet type)] in output order."""
    seen: dict[tuple[bytes, int], list[tuple[int, int]]] = collections.defaultdict(list)
    for ts, data in records:
        frame = data[16:]
        seq = parse_seq(frame)
        if seq is None:
            continue
        pkttype = frame[10]
        ip = frame[SLL2_LEN:]
        ports = ip[(ip[0] & 0x0F) * 4 :][:4]
        seen[(ports, seq)].append((ts, pkttype))
    return seen


def test_merged_capture_holds_every_packet_of_every_host_in_order(
    fleet: Workers, tmp_path: Path
) -> None:
    h1, h2, h3 = fleet.fleet.hosts
    # While one flow runs, the third host is idle: a generous --max-delay keeps a loaded test
    # machine's scheduling delays from turning into late (out of place) records.
    cli = Cli(
        ["--max-delay", "3s", fleet.url(0), fleet.url(1), fleet.url(2)], tmp_path / "out.pcap"
    )
    cli.wait_capturing(fleet, 3)

    sent = {
        5001: udp_traffic(h1, h2, port=5001, count=200, rate=2000, src_port=4001),
        5002: udp_traffic(h2, h3, port=5002, count=200, rate=2000, src_port=4002),
        5003: udp_traffic(h3, h1, port=5003, count=200, rate=2000, src_port=4003),
    }
    time.sleep(0.6)
    status = cli.finish()
    records = cli.records()

    assert status == 0, cli.stderr
    stamps = [ts for ts, _ in records]
    assert stamps == sorted(stamps), cli.stderr
    seen = flows(records)
    for dport, traffic in sent.items():
        assert traffic.received == 200
        ports = struct.pack(">HH", dport - 1000, dport)
        for seq in range(200):
            copies = seen[(ports, seq)]
            # Captured twice: leaving the sender, then arriving at the receiver, in that order.
            assert [pkttype for _, pkttype in copies] == [PACKET_OUTGOING, 0], (dport, seq)
    payloads = {data[16 + SLL2_LEN + 28 :] for _, data in records}
    assert payloads == {p for t in sent.values() for p in t.sent}
    assert "ddump: 1200 packets written" in cli.stderr
    # Each worker was asked for tcpdump's counts at the end: nothing was dropped.
    assert cli.stderr.count(", 0 dropped by the kernel  [") == 3, cli.stderr


def test_batch_captures_come_whole_and_in_order_at_the_default_max_delay(
    fleet: Workers, tmp_path: Path
) -> None:
    # --batch: tcpdump hands packets over a block at a time, up to 1 s after capture; the
    # merge waits that long for those targets, so nothing comes out late or out of order.
    h1, h2, h3 = fleet.fleet.hosts
    cli = Cli(["--batch", fleet.url(0), fleet.url(1), fleet.url(2)], tmp_path / "out.pcap")
    cli.wait_capturing(fleet, 3)
    for worker in fleet.workers:
        starts = [line for line in worker.log().splitlines() if " start:" in line]
        assert " batch pid=" in starts[-1], starts[-1]
    sent = udp_traffic(h1, h2, port=5001, count=300, rate=3000, src_port=4001)
    udp_traffic(h3, h1, port=5003, count=30, rate=300, src_port=4003)
    time.sleep(0.2)
    # Ctrl-C right away: ddump waits for the blocks the kernel still holds, not a packet lost.
    status = cli.finish()
    records = cli.records()

    assert status == 0, cli.stderr
    stamps = [ts for ts, _ in records]
    assert stamps == sorted(stamps)
    assert sent.received == 300
    seen = flows(records)
    ports = struct.pack(">HH", 4001, 5001)
    for seq in range(300):
        assert [pkttype for _, pkttype in seen[(ports, seq)]] == [PACKET_OUTGOING, 0], seq
    assert "ddump: 660 packets written" in cli.stderr
    assert "late" not in cli.stderr, cli.stderr
    assert "SIGINT: stopping in 1.25 s, once batch targets have handed over" in cli.stderr


def capture_h1_to_h2(fleet: Workers, out: Path, *, port: int, count: int) -> Cli:
    """h1 and h2 captured into `out` while h1 sends `count` datagrams to h2, then stopped."""
    h1, h2, _ = fleet.fleet.hosts
    cli = Cli([fleet.url(0), fleet.url(1)], out)
    cli.wait_capturing(fleet, 2)
    udp_traffic(h1, h2, port=port, count=count, rate=1000)
    time.sleep(0.6)
    assert cli.finish() == 0, cli.stderr
    return cli


def test_output_is_read_by_tcpdump_and_tshark(fleet: Workers, tmp_path: Path) -> None:
    tshark = require_tool("tshark")
    h2 = fleet.fleet.hosts[1]
    cli = capture_h1_to_h2(fleet, tmp_path / "out.pcap", port=5004, count=20)

    by_tcpdump = subprocess.run(
        ["tcpdump", "-nn", "-r", str(cli.out)], capture_output=True, text=True, timeout=30
    )
    by_tshark = subprocess.run(
        [tshark, "-r", str(cli.out), "-T", "fields", "-e", "udp.dstport"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert by_tcpdump.stdout.count(f"> {h2.address}.5004: UDP, length 64") == 40, by_tcpdump
    assert by_tshark.stdout.split() == ["5004"] * 40, by_tshark.stderr


def test_worker_killed_mid_stream_is_reported_and_the_others_go_on(
    fleet: Workers, tmp_path: Path
) -> None:
    h1, h2, _ = fleet.fleet.hosts
    cli = Cli([fleet.url(0), fleet.url(1), fleet.url(2)], tmp_path / "out.pcap")
    cli.wait_capturing(fleet, 3)
    udp_traffic(h1, h2, port=5005, count=50, rate=1000)

    fleet.workers[2].process.kill()
    fleet.workers[2].process.wait(5)
    time.sleep(0.5)
    after = udp_traffic(h1, h2, port=5006, count=50, rate=1000)
    time.sleep(0.6)
    status = cli.finish()
    records = cli.records()

    assert status == 1
    assert f"{fleet.fleet.hosts[2].address}:8475: connection lost mid-stream" in cli.stderr
    ports = struct.pack(">HH", 0, 5006)[2:]
    got = {seq for (p, seq) in flows(records) if p[2:] == ports}
    assert got == set(range(len(after.sent)))


def test_bad_filter_on_one_target_names_it_with_tcpdumps_message(
    fleet: Workers, tmp_path: Path
) -> None:
    h1, h2, _ = fleet.fleet.hosts
    cli = Cli([fleet.url(0), fleet.url(1, "udp and ("), fleet.url(2)], tmp_path / "out.pcap")
    cli.wait_capturing(fleet, 1)
    udp_traffic(h1, h2, port=5007, count=10, rate=1000)
    time.sleep(0.6)
    status = cli.finish()

    assert status == 1
    line = next(x for x in cli.stderr.splitlines() if f"{h2.address}:8475" in x)
    assert "HTTP 400" in line, cli.stderr
    assert len(cli.records()) == 10  # leaving h1; h3 saw none


def test_idle_host_does_not_hold_back_the_busy_ones(fleet: Workers, tmp_path: Path) -> None:
    h1, h2, _ = fleet.fleet.hosts
    cli = Cli(
        ["-c", "20", "--max-delay", "200ms", fleet.url(0), fleet.url(1), fleet.url(2)],
        tmp_path / "out.pcap",
    )
    cli.wait_capturing(fleet, 3)
    udp_traffic(h1, h2, port=5008, count=10, rate=1000)

    status = cli.finish(signum=None, timeout=10)  # -c 20 ends it, though h3 stays silent

    assert status == 0, cli.stderr
    assert len(cli.records()) == 20


def test_closed_stdout_ends_quietly_and_stops_remote_captures(fleet: Workers) -> None:
    h1, h2, _ = fleet.fleet.hosts
    ddump = subprocess.Popen(
        [sys.executable, "-m", "ddump.cli.main", fleet.url(0), fleet.url(1)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    reader = subprocess.Popen(
        ["tcpdump", "-c", "5", "-nn", "-r", "-"],
        stdin=ddump.stdout,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert ddump.stdout is not None
    ddump.stdout.close()
    for worker in fleet.workers[:2]:
        worker.wait_log("start:", 15)
    time.sleep(0.3)
    udp_traffic(h1, h2, port=5009, count=20, rate=1000)

    lines, _ = reader.communicate(timeout=20)
    _, err = ddump.communicate(timeout=20)

    assert len(lines.decode().splitlines()) == 5
    assert ddump.returncode == 0, err
    assert b"Traceback" not in err
    for worker in fleet.workers[:2]:
        assert "client closed" in worker.wait_log(" end:", 5)
    for host in (h1, h2):
        assert _tcpdumps(host) == []


def _command(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return None  # exited meanwhile


def _tcpdumps(host: Host) -> list[int]:
    deadline = time.monotonic() + 3
    while True:
        found = [pid for pid in host.pids() if _command(pid) == "tcpdump"]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_output_header_is_nanosecond_pcap(fleet: Workers, tmp_path: Path) -> None:
    cli = Cli(["--duration", "1", fleet.url(0)], tmp_path / "out.pcap")
    assert cli.finish(signum=None, timeout=15) == 0, cli.stderr

    header = PcapHeader.parse(cli.out.read_bytes()[:24])
    assert header.nano and header.linktype == LINKTYPE_LINUX_SLL2


def test_pcapng_names_each_packets_host_and_interface(fleet: Workers, tmp_path: Path) -> None:
    tshark = require_tool("tshark")
    h1, h2, _ = fleet.fleet.hosts
    cli = capture_h1_to_h2(fleet, tmp_path / "out.pcapng", port=5010, count=10)

    fields = subprocess.run(
        [tshark, "-r", str(cli.out), "-T", "fields", "-e", "frame.interface_name",
         "-e", "frame.time_epoch", "-e", "udp.dstport"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    rows = [line.split("\t") for line in fields.stdout.splitlines()]

    assert len(rows) == 20, fields.stderr
    assert {name for name, _, _ in rows} == {f"{h1.address}:8475:eth0", f"{h2.address}:8475:eth0"}
    stamps = [int(t.replace(".", "")) for _, t, _ in rows]
    assert stamps == sorted(stamps) and all(len(t.split(".")[1]) == 9 for _, t, _ in rows)
    assert {port for _, _, port in rows} == {"5010"}
