"""ddump-worker with the real tcpdump, in network namespaces, with numbered traffic.

Every test starts a fleet (tests/netns.py): the worker runs in host h1 (198.18.0.1), traffic
comes from h2, and this process is the client at 198.18.0.254. Assertions are on what a user
sees: the packets in the pcap, the HTTP status and text, the processes left behind.
"""

from __future__ import annotations

import contextlib
import grp
import http.client
import json
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tornado

import ddump
from ddump.pcap import LINKTYPE_LINUX_SLL2, PcapStreamParser
from tests.conftest import require, require_root, require_tool
from tests.netns import (
    Fleet,
    Host,
    UnixHTTPConnection,
    WorkerProcess,
    icmp_traffic,
    parse_seq,
    tcp_traffic,
    udp_traffic,
    worker_argv,
)
from tests.procs import exit_time

PORT = 8475
SLL2_LEN = 20
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP = 1, 6, 17

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def tcpdump() -> str:
    require_root()
    require_tool("ip")
    return require_tool("tcpdump")


@pytest.fixture
def fleet(tcpdump: str) -> Iterator[Fleet]:
    with Fleet(2) as created:
        yield created


def start_worker(
    host: Host, tcpdump: str, *args: str, python: str = sys.executable, **popen: Any
) -> WorkerProcess:
    """The worker from this checkout in `host`, on :8475 unless args say --listen."""
    listen = () if "--listen" in args else ("--listen", f":{PORT}")
    argv = worker_argv("--tcpdump", tcpdump, *listen, *args, python=python)
    return reachable(WorkerProcess(argv, host, **popen), host)


def reachable(worker: WorkerProcess, host: Host) -> WorkerProcess:
    """Wait until the worker listens; make its address one this process can connect to."""
    if worker.wait_listening().startswith("0.0.0.0:"):
        worker.address = f"{host.address}:{PORT}"
    return worker


# ---- reading what the user gets ----


class Packet:
    """One captured packet: SLL2, then IPv4; the transport's ports and payload."""

    def __init__(self, record: bytes) -> None:
        frame = record[16:]
        self.ip = frame[SLL2_LEN:]
        header_len = (self.ip[0] & 0x0F) * 4
        self.protocol = self.ip[9]
        transport = self.ip[header_len:]
        self.sport = self.dport = self.icmp_type = 0
        if self.protocol == IPPROTO_UDP:
            self.sport, self.dport = int.from_bytes(transport[0:2]), int.from_bytes(transport[2:4])
            self.payload = transport[8:]
        elif self.protocol == IPPROTO_TCP:
            self.sport, self.dport = int.from_bytes(transport[0:2]), int.from_bytes(transport[2:4])
            self.payload = transport[(transport[12] >> 4) * 4 :]
        else:
            self.payload = transport[8:]  # ICMP echo: type, code, checksum, id, seq
            self.icmp_type = transport[0]


class CaptureClient:
    """GET /capture, headers read at once; the body is read by a thread into pcap records."""

    def __init__(self, connection: http.client.HTTPConnection, query: str) -> None:
        self.connection = connection
        connection.connect()
        self.socket = connection.sock
        connection.request("GET", f"/capture?{query}")
        self.response = connection.getresponse()
        self.parser = PcapStreamParser()
        self.records: list[bytes] = []
        self.clean_end = False
        self.error: BaseException | None = None
        if self.response.status == 200:
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()

    def _read(self) -> None:
        try:
            while chunk := self.response.read1(65536):
                self.records += [record for _, record in self.parser.feed(chunk)]
            self.parser.close()
            self.clean_end = True  # http.client raises IncompleteRead without the last chunk
        except BaseException as error:
            self.error = error

    def packets(self) -> list[Packet]:
        return [Packet(record) for record in list(self.records)]

    def wait(self, condition: Callable[[], bool], timeout: float = 10) -> None:
        end = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < end, f"not met in {timeout} s; {len(self.records)} records"
            time.sleep(0.01)

    def wait_end(self, timeout: float = 10) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the response did not end"
        assert self.error is None and self.clean_end, f"unclean end: {self.error!r}"

    def close(self) -> None:
        """Disconnect, as a client that goes away does: the worker sees the FIN."""
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_RDWR)  # also wakes the reading thread
        if self.response.status == 200:
            self._thread.join(10)
        self.connection.close()


def capture(worker: WorkerProcess, query: str = "") -> CaptureClient:
    host, port = worker.address.rsplit(":", 1)
    return CaptureClient(http.client.HTTPConnection(host, int(port), timeout=10), query)


def udp_payloads(packets: list[Packet], port: int) -> list[bytes]:
    return [p.payload for p in packets if p.protocol == IPPROTO_UDP and p.dport == port]


def tcpdump_children(worker: WorkerProcess) -> list[int]:
    """The worker's tcpdump processes (direct children; `ip netns exec` execs the worker)."""
    children = Path(f"/proc/{worker.process.pid}/task/{worker.process.pid}/children")
    return [int(pid) for pid in children.read_text().split()]


def gone_within(pid: int, timeout: float) -> bool:
    """True once `pid` has exited (gone or a zombie awaiting its reaper) within `timeout`."""
    return exit_time(pid, timeout) is not None


def packet_sockets(host: Host) -> int:
    """Open packet sockets in the host's namespace (a capture holds one)."""
    return len(host.run(["cat", "/proc/net/packet"]).stdout.splitlines()) - 1


# ---- every packet, in order, byte for byte ----


def test_every_udp_datagram_sent_is_captured_in_order_byte_for_byte(
    fleet: Fleet, tcpdump: str
) -> None:
    h1, h2 = fleet.hosts
    with start_worker(h1, tcpdump) as worker:
        client = capture(worker, "filter=udp+port+5000")
        assert client.response.status == 200
        assert client.response.getheader("Content-Type") == "application/vnd.tcpdump.pcap"
        sent = udp_traffic(h2, h1, port=5000, count=300, rate=3000, size=100)
        assert sent.received == 300
        client.wait(lambda: len(client.records) >= 300)
        client.close()
    assert client.parser.header is not None
    assert client.parser.header.linktype == LINKTYPE_LINUX_SLL2
    assert client.parser.header.nano
    assert udp_payloads(client.packets(), 5000) == sent.sent


def capture_stats(worker: WorkerProcess, client: CaptureClient) -> dict[str, Any]:
    """GET /capture/stats for the client's capture."""
    token = client.response.getheader("X-Ddump-Capture")
    host, port = worker.address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request("GET", f"/capture/stats?id={token}")
    response = connection.getresponse()
    assert response.status == 200, response.read()
    stats: dict[str, Any] = json.loads(response.read())
    connection.close()
    return stats


def test_tcpdumps_counts_are_there_while_it_runs_and_after(fleet: Fleet, tcpdump: str) -> None:
    h1, h2 = fleet.hosts
    with start_worker(h1, tcpdump) as worker:
        client = capture(worker, "filter=udp+port+5000")
        udp_traffic(h2, h1, port=5000, count=200, rate=2000)
        client.wait(lambda: len(client.records) >= 200)
        running = capture_stats(worker, client)  # tcpdump is asked with SIGUSR1
        [pid] = tcpdump_children(worker)
        client.close()
        assert gone_within(pid, 2)
        ended = capture_stats(worker, client)  # its exit counts, kept by the worker
    assert running["running"] is True and running["captured"] >= 200
    assert running["dropped_by_kernel"] == 0
    assert ended["running"] is False and ended["captured"] >= 200
    assert ended["received"] >= ended["captured"] and ended["dropped_by_kernel"] == 0


def ring_bytes(pid: int) -> list[int]:
    """Sizes of the packet rings tcpdump `pid` has mapped (socket mappings in its maps)."""
    sizes = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        if line.rstrip().endswith("]") and "socket:[" in line:
            start, end = (int(part, 16) for part in line.split()[0].split("-"))
            sizes.append(end - start)
    return sizes


@pytest.mark.parametrize(("query", "mib"), [("", 32), ("batch=1", 32), ("snaplen=65535", 64)])
def test_the_ring_a_capture_pins_is_what_the_readme_says(
    fleet: Fleet, tcpdump: str, query: str, mib: int
) -> None:
    # 128 slots of the default snapshot length fit 256 KiB blocks (with tcpdump's 262144 they
    # took 512 KiB each: 64 MiB); an explicit 65535 gets 512 slots of 128 KiB.
    h1, _ = fleet.hosts
    with start_worker(h1, tcpdump) as worker:
        client = capture(worker, query)
        assert client.response.status == 200
        (pid,) = tcpdump_children(worker)
        sizes = ring_bytes(pid)
        client.close()
    assert len(sizes) == 1, sizes
    assert mib * 2**20 <= sizes[0] <= (mib + 1) * 2**20, sizes[0] / 2**20


def test_identical_captures_share_one_tcpdump_each_from_when_it_joined(
    fleet: Fleet, tcpdump: str
) -> None:
    h1, h2 = fleet.hosts
    with start_worker(h1, tcpdump) as worker:
        first = capture(worker, "filter=udp+port+5000")
        before = udp_traffic(h2, h1, port=5000, count=100, rate=2000)
        first.wait(lambda: len(first.records) >= 100)
        second = capture(worker, "filter=udp+port+5000")
        [pid] = tcpdump_children(worker)
        both = udp_traffic(h2, h1, port=5000, count=200, rate=2000, size=80)
        first.wait(lambda: len(first.records) >= 300)
        second.wait(lambda: len(second.records) >= 200)
        joined = capture_stats(worker, second)
        first.close()
        after = udp_traffic(h2, h1, port=5000, count=50, rate=2000, size=96)
        second.wait(lambda: len(second.records) >= 250)
        assert tcpdump_children(worker) == [pid]  # still running for the second client
        second.close()
        assert gone_within(pid, 2)
    assert udp_payloads(first.packets(), 5000) == before.sent + both.sent
    assert udp_payloads(second.packets(), 5000) == both.sent + after.sent
    assert 200 <= joined["captured"] < 300  # tcpdump's counts since the second client joined


def test_tcp_stream_and_icmp_echoes_are_captured_whole(fleet: Fleet, tcpdump: str) -> None:
    h1, h2 = fleet.hosts
    with start_worker(h1, tcpdump) as worker:
        client = capture(worker, "filter=tcp+port+5001+or+icmp")
        tcp = tcp_traffic(h2, h1, port=5001, count=50, size=80)
        icmp = icmp_traffic(h2, h1, count=5)
        assert (tcp.received, icmp.received) == (50, 5)
        client.wait(lambda: sum(p.protocol == IPPROTO_ICMP for p in client.packets()) >= 10)
        client.close()
    packets = client.packets()
    to_server = b"".join(
        p.payload for p in packets if p.protocol == IPPROTO_TCP and p.dport == 5001
    )
    assert to_server == b"".join(tcp.sent)
    echoes = [p for p in packets if p.protocol == IPPROTO_ICMP]
    assert [(p.icmp_type, parse_seq(p.payload)) for p in echoes] == [
        (kind, seq) for seq in range(5) for kind in (8, 0)
    ]
    assert [p.payload for p in echoes if p.icmp_type == 8] == icmp.sent


# ---- never capture ourselves ----


def test_the_workers_port_never_appears_whatever_the_filter(fleet: Fleet, tcpdump: str) -> None:
    h1, h2 = fleet.hosts
    with start_worker(h1, tcpdump) as worker:
        client = capture(worker, "filter=tcp+or+(udp)+or+(tcp+port+8475)&duration=2")
        assert client.response.status == 200
        for _ in range(3):  # more traffic on the worker's port, besides this very stream
            health = http.client.HTTPConnection(h1.address, PORT, timeout=5)
            health.request("GET", "/health")
            assert health.getresponse().status == 200
            health.close()
        udp = udp_traffic(h2, h1, port=5000, count=20)
        tcp = tcp_traffic(h2, h1, port=5001, count=5)
        client.wait_end()
    packets = client.packets()
    assert [p for p in packets if PORT in (p.sport, p.dport)] == []
    assert udp_payloads(packets, 5000) == udp.sent
    assert any(p.dport == 5001 for p in packets)
    assert tcp.received == 5


def test_bad_filter_gets_400_with_tcpdumps_message(fleet: Fleet, tcpdump: str) -> None:
    with start_worker(fleet.hosts[0], tcpdump) as worker:
        client = capture(worker, "filter=udp+port")
        text = client.response.read().decode()
        assert tcpdump_children(worker) == []
    assert client.response.status == 400
    assert "syntax error" in text


def test_a_filter_trying_to_escape_its_parentheses_gets_400(fleet: Fleet, tcpdump: str) -> None:
    with start_worker(fleet.hosts[0], tcpdump) as worker:
        client = capture(worker, "filter=tcp)+or+(tcp+port+8475")
        assert client.response.status == 400
        assert "unbalanced parentheses" in client.response.read().decode()


# ---- lifecycle ----


def test_disconnect_stops_tcpdump_within_a_second_with_no_packet_matching(
    fleet: Fleet, tcpdump: str
) -> None:
    h1 = fleet.hosts[0]
    with start_worker(h1, tcpdump) as worker:
        baseline = packet_sockets(h1)
        client = capture(worker, "filter=udp+port+1")
        [pid] = tcpdump_children(worker)
        assert packet_sockets(h1) == baseline + 1
        client.close()
        assert gone_within(pid, 1), "tcpdump still runs 1 s after the client left"
        assert packet_sockets(h1) == baseline
        end_line = worker.wait_log(" end:")
    assert "reason=client closed" in end_line
    assert "captured=0" in end_line and "dropped=0" in end_line


def test_sigterm_ends_the_response_cleanly_with_every_packet(fleet: Fleet, tcpdump: str) -> None:
    h1, h2 = fleet.hosts
    with start_worker(h1, tcpdump) as worker:
        client = capture(worker, "filter=udp+port+5000")
        [pid] = tcpdump_children(worker)
        sent = udp_traffic(h2, h1, port=5000, count=50)
        client.wait(lambda: len(client.records) >= 50)
        assert worker.stop(signal.SIGTERM) == 0
        client.wait_end()
        assert gone_within(pid, 1)
    assert udp_payloads(client.packets(), 5000) == sent.sent
    assert "captured=50" in worker.log()


def test_sigkill_of_the_worker_kills_its_tcpdump(fleet: Fleet, tcpdump: str) -> None:
    h1 = fleet.hosts[0]
    with start_worker(h1, tcpdump) as worker:
        baseline = packet_sockets(h1)
        client = capture(worker, "filter=udp+port+1")
        [pid] = tcpdump_children(worker)
        # The worker is root here; its tcpdump runs unprivileged with CAP_NET_RAW alone, set up
        # before the parent-death signal (a later uid change would clear that signal).
        status = Path(f"/proc/{pid}/status").read_text()
        assert "\nUid:\t0\t" not in status
        assert "\nCapEff:\t0000000000002000\n" in status
        worker.process.kill()
        assert gone_within(pid, 1), "tcpdump outlived its SIGKILLed worker"
        client.close()
        assert packet_sockets(h1) == baseline


def test_count_stops_after_n_packets_and_ends_cleanly(fleet: Fleet, tcpdump: str) -> None:
    h1, h2 = fleet.hosts
    with start_worker(h1, tcpdump) as worker:
        client = capture(worker, "filter=udp+port+5000&count=5")
        sent = udp_traffic(h2, h1, port=5000, count=20)
        client.wait_end()
    assert udp_payloads(client.packets(), 5000) == sent.sent[:5]


def test_duration_ends_an_idle_capture_cleanly_on_time(fleet: Fleet, tcpdump: str) -> None:
    with start_worker(fleet.hosts[0], tcpdump) as worker:
        start = time.monotonic()
        client = capture(worker, "filter=udp+port+1&duration=1")
        client.wait_end()
        elapsed = time.monotonic() - start
    assert client.records == []
    assert 1 <= elapsed < 3


@pytest.mark.parametrize("then_sigterm", [False, True])
def test_a_batch_captures_duration_keeps_its_last_second(
    fleet: Fleet, tcpdump: str, then_sigterm: bool
) -> None:
    # The kernel hands a batch capture's packets over a block at a time, up to a second after
    # they came: a stop waits for them, then cuts the stream at the stop's time. A second stop
    # meanwhile (the worker told to stop) changes neither.
    h1, h2 = fleet.hosts
    with start_worker(h1, tcpdump) as worker:
        start = time.monotonic()
        client = capture(worker, "filter=udp+port+5000&batch=1&duration=2.5")
        assert client.response.status == 200
        clock = int(client.response.getheader("X-Ddump-Clock") or 0)  # the duration starts
        sender = threading.Thread(
            target=udp_traffic, args=(h2, h1), kwargs={"port": 5000, "count": 200, "rate": 50}
        )
        sender.start()
        if then_sigterm:
            time.sleep(2.8 - (time.monotonic() - start))  # while it hands over
            worker.process.send_signal(signal.SIGTERM)
        client.wait_end()
        elapsed = time.monotonic() - start
        sender.join(10)
        log = worker.log()
    seqs = [parse_seq(p.payload) for p in client.packets()]
    stamps = [
        sec * 10**9 + nsec for sec, nsec in (struct.unpack_from("<II", r) for r in client.records)
    ]
    # Every packet up to the stop, 2.5 s after the capture began, in order, and none after it
    # (the ring hands the block of 2..3 s over at 3 s, after the stop: without the wait, the
    # packets of 2..2.5 s were lost). A packet comes every 20 ms.
    assert client.clean_end and client.error is None
    assert seqs == list(range(len(seqs)))
    assert clock and stamps, (clock, len(stamps))
    assert (stamps[-1] - clock) / 1e9 >= 2.5 - 0.15, (stamps[-1] - clock) / 1e9
    assert (stamps[-1] - clock) / 1e9 <= 2.5 + 0.15, (stamps[-1] - clock) / 1e9
    assert 2.5 <= elapsed < 5, elapsed
    [end] = [line for line in log.splitlines() if "capture 1 end:" in line]
    assert "reason=duration reached" in end, end
    assert f"bytes={client.parser.bytes_in} packets={len(seqs)} " in end, end


def test_unix_socket_serves_captures(fleet: Fleet, tcpdump: str) -> None:
    h1, h2 = fleet.hosts
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "worker.sock")
        with start_worker(h1, tcpdump, "--listen", f"unix:{path}") as worker:
            client = CaptureClient(UnixHTTPConnection(path), "filter=udp+port+5000&count=10")
            assert client.response.status == 200
            sent = udp_traffic(h2, h1, port=5000, count=10)
            client.wait_end()
            assert worker.stop() == 0
        assert not os.path.exists(path)
    assert udp_payloads(client.packets(), 5000) == sent.sent


def test_curl_piped_into_tcpdump_shows_the_packets(fleet: Fleet, tcpdump: str) -> None:
    curl = require_tool("curl")
    h1, h2 = fleet.hosts
    with start_worker(h1, tcpdump) as worker:
        fetch = subprocess.Popen(
            [curl, "-sN", f"{worker.url()}?filter=udp+port+5000&count=3"], stdout=subprocess.PIPE
        )
        read = subprocess.Popen(
            [tcpdump, "-nr", "-"],
            stdin=fetch.stdout,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert fetch.stdout is not None
        fetch.stdout.close()
        worker.wait_log(" start:")
        udp_traffic(h2, h1, port=5000, count=3)
        out, err = read.communicate(timeout=10)
        assert fetch.wait(10) == 0
    lines = out.decode().splitlines()
    assert len(lines) == 3, err.decode()
    assert all(f"{h2.address}." in line and f"{h1.address}.5000: UDP" in line for line in lines)


def test_ipv6_listen_address_is_served(fleet: Fleet, tcpdump: str) -> None:
    curl = require_tool("curl")
    h1 = fleet.hosts[0]
    with start_worker(h1, tcpdump, "--listen", "[::1]:8475") as worker:
        assert worker.address == "[::1]:8475"
        out = h1.run([curl, "-s", "-g", "http://[::1]:8475/health"], timeout=10).stdout
        assert b'"status": "ok"' in out
    assert "(host ::1 and tcp port 8475)" in worker.log()


# ---- running without root ----


def nobody_python(directory: str) -> tuple[str, dict[str, str]]:
    """An interpreter and PYTHONPATH that `nobody` can use: ddump and tornado are copied to a
    world-readable place (the virtualenv may sit under /root, closed to other users)."""
    os.chmod(directory, 0o755)
    for package in (ddump, tornado):
        source = Path(package.__file__ or "").parent
        shutil.copytree(source, Path(directory) / source.name)
    for candidate in (os.path.realpath(sys.executable), "/usr/bin/python3"):
        probe = subprocess.run(
            [*as_nobody(), candidate, "-c", "import sys; assert sys.version_info >= (3, 11)"],
            capture_output=True,
            timeout=30,
        )
        if probe.returncode == 0:
            return candidate, {**os.environ, "PYTHONPATH": directory}
    require(False, "no Python >= 3.11 that the user nobody may run")
    raise AssertionError


def as_nobody(*capabilities: str) -> list[str]:
    group = grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name
    argv = [require_tool("setpriv"), "--reuid=nobody", f"--regid={group}", "--clear-groups"]
    for capability in capabilities:
        argv += [f"--inh-caps=+{capability}", f"--ambient-caps=+{capability}"]
    return argv


def test_worker_as_nobody_with_only_cap_net_raw_captures(fleet: Fleet, tcpdump: str) -> None:
    h1, h2 = fleet.hosts
    with tempfile.TemporaryDirectory() as directory:
        python, env = nobody_python(directory)
        argv = [*as_nobody("net_raw"), *worker_argv("--tcpdump", tcpdump, python=python)]
        with reachable(WorkerProcess([*argv, "--listen", f":{PORT}"], h1, env=env), h1) as worker:
            client = capture(worker, "filter=udp+port+5000&count=10")
            assert client.response.status == 200
            [pid] = tcpdump_children(worker)
            assert Path(f"/proc/{pid}/status").read_text().count("65534") >= 1
            sent = udp_traffic(h2, h1, port=5000, count=10)
            client.wait_end()
            assert capture_stats(worker, client)["captured"] == 10
            assert "running as root" not in worker.log()
            assert worker.stop() == 0
    assert udp_payloads(client.packets(), 5000) == sent.sent


def test_worker_as_nobody_without_the_capability_gets_503_naming_the_fix(
    fleet: Fleet, tcpdump: str
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        python, env = nobody_python(directory)
        argv = [
            *as_nobody(),
            *worker_argv("--tcpdump", tcpdump, "--listen", f":{PORT}", python=python),
        ]
        with reachable(WorkerProcess(argv, fleet.hosts[0], env=env), fleet.hosts[0]) as worker:
            client = capture(worker, "filter=udp")
            text = client.response.read().decode()
            assert client.response.status == 503
            assert "CAP_NET_RAW" in text and "AmbientCapabilities" in text
            assert "permission" in text.lower()
