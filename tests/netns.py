"""Test hosts in network namespaces, and numbered traffic between them. Needs root and `ip`.

    with Fleet(2) as fleet:                      # hosts 198.18.S.1, .2; this process is .254
        a, b = fleet.hosts
        with WorkerProcess(worker_argv("--listen", ":8475"), a) as worker:
            worker.wait_listening()              # the log line says it listens
            ...                                  # reach it at http://{a.address}:8475
            sent = udp_traffic(b, a, port=5000, count=100)  # sent.sent: payloads, in order

Layout: a bridge in a namespace of its own; each host namespace has `eth0` (198.18.S.i/24) and
`lo` up; a veth in the root namespace (198.18.S.254/24) joins the same bridge. S is 0 unless
another fleet on the machine holds it. MAC addresses are fixed and every neighbour entry is
static, so no ARP ever shows in a capture or delays a first packet, and IPv6 is off on the
veths (no router solicitations either). Teardown always runs: it kills every process left in
the namespaces, deletes them and the root link. Only 198.18.0.0/15 and loopback are used.

Traffic: `udp_traffic`, `tcp_traffic`, `icmp_traffic` send numbered packets (`payload(seq)`,
`parse_seq(bytes)`) at a bounded rate; each run is `python tests/netns.py udp-send|... ARGS`
inside the source namespace. `WorkerProcess` runs ddump-worker with its log in a file;
`UnixHTTPConnection` is http.client over a unix socket.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import itertools
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

SCRIPT = os.path.abspath(__file__)
LOCK_PATH = "/run/lock/ddump-netns.lock" if os.path.isdir("/run/lock") else "/tmp/ddump-netns.lock"
ROOT_HOST = 254
SEQ_MARK = b"ddump-seq "
_counter = itertools.count(1)


def payload(seq: int, size: int = 64) -> bytes:
    """The payload of numbered packet `seq`: `ddump-seq 00000042 ` padded with dots to size."""
    head = SEQ_MARK + b"%08d " % seq
    return head + b"." * max(0, size - len(head))


def parse_seq(data: bytes) -> int | None:
    """The sequence number in a packet's bytes (anywhere in it), or None."""
    at = data.find(SEQ_MARK)
    if at < 0:
        return None
    digits = data[at + len(SEQ_MARK) : at + len(SEQ_MARK) + 8]
    return int(digits) if digits.isdigit() else None


def _free_subnet() -> int:
    """The first 198.18.S.0/24 that no interface of the root namespace has an address in."""
    out = subprocess.run(
        ["ip", "-4", "-o", "address", "show"], capture_output=True, text=True, check=True
    ).stdout
    used = {int(match) for match in re.findall(r"inet 198\.18\.(\d+)\.\d+/", out)}
    free = [subnet for subnet in range(256) if subnet not in used]
    if not free:
        raise RuntimeError("every 198.18.S.0/24 is in use: leftover fleets? see `ip netns list`")
    return free[0]


def _ip(*args: str, stdin: str | None = None) -> None:
    subprocess.run(["ip", *args], input=stdin, text=True, check=True, timeout=30)


@dataclass
class Host:
    """One namespace; `address` is its IPv4 address on the fleet's bridge."""

    name: str
    netns: str
    address: str
    mac: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(
        self, argv: Sequence[str], *, timeout: float = 30, check: bool = True, **kwargs: Any
    ) -> subprocess.CompletedProcess[bytes]:
        """Run to completion inside the namespace; output captured unless told otherwise."""
        kwargs.setdefault("capture_output", True)
        return subprocess.run(self.argv(argv), timeout=timeout, check=check, **kwargs)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start inside the namespace; the fleet stops it at teardown if it still runs."""
        process = subprocess.Popen(self.argv(argv), **kwargs)
        self.processes.append(process)
        return process

    def pids(self) -> list[int]:
        """Every process inside the namespace now (whoever started it)."""
        out = subprocess.run(
            ["ip", "netns", "pids", self.netns], capture_output=True, text=True, timeout=10
        )
        return [int(pid) for pid in out.stdout.split()]


class Fleet:
    """A bridge, `n_hosts` namespaces on it, and this process's own way in (198.18.S.254).

    S is `subnet`, or by default the first one no other fleet on this machine uses (test runs
    may overlap: two root-namespace routes to one /24 would send packets to the wrong fleet).
    Hosts are 198.18.S.1, .2, ...; use `host.address`, not a literal.
    """

    def __init__(self, n_hosts: int, *, subnet: int | None = None) -> None:
        if not 1 <= n_hosts <= 250 or not 0 <= (subnet or 0) <= 255:
            raise ValueError("1..250 hosts on subnet 198.18.0..255.0/24")
        # Unique per process and fleet, and short: `{tag}r` must fit in 15 characters.
        self.tag = f"dd{os.getpid()}x{next(_counter)}"
        self.n_hosts = n_hosts
        self.subnet = subnet
        self.bridge_ns = f"{self.tag}b"
        self.root_link = f"{self.tag}r"
        self.root_address = ""
        self.hosts: list[Host] = []

    def address(self, index: int) -> str:
        assert self.subnet is not None, "the subnet is chosen when the fleet is entered"
        return f"198.18.{self.subnet}.{index}"

    def _mac(self, index: int) -> str:
        return f"02:dd:c6:12:{self.subnet or 0:02x}:{index:02x}"

    def __enter__(self) -> Fleet:
        try:
            # Choosing a subnet and taking it (the root link's address) is one step for
            # every fleet on the machine.
            with open(LOCK_PATH, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if self.subnet is None:
                    self.subnet = _free_subnet()
                self.root_address = self.address(ROOT_HOST)
                self.hosts = [
                    Host(f"h{i}", f"{self.tag}h{i}", self.address(i), self._mac(i))
                    for i in range(1, self.n_hosts + 1)
                ]
                self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        _ip("netns", "add", self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge", "forward_delay", "0")
        _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        neighbours = [(self.root_address, self._mac(ROOT_HOST))]
        neighbours += [(host.address, host.mac) for host in self.hosts]
        for index, host in enumerate(self.hosts, start=1):
            _ip("netns", "add", host.netns)
            _ip("-n", host.netns, "link", "set", "lo", "up")
            _ip(
                "-n", host.netns, "link", "add", "eth0", "address", host.mac, "type", "veth",
                "peer", "name", f"p{index}", "netns", self.bridge_ns,
            )  # fmt: skip
            self._attach(f"p{index}")
            self._configure(["-n", host.netns], "eth0", host.address, host.mac, neighbours)
            host.run(["sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=1"])
        _ip(
            "link", "add", self.root_link, "address", self._mac(ROOT_HOST), "type", "veth",
            "peer", "name", "root", "netns", self.bridge_ns,
        )  # fmt: skip
        self._attach("root")
        with open(f"/proc/sys/net/ipv6/conf/{self.root_link}/disable_ipv6", "w") as flag:
            flag.write("1")
        self._configure([], self.root_link, self.root_address, self._mac(ROOT_HOST), neighbours)

    def _attach(self, port: str) -> None:
        _ip("-n", self.bridge_ns, "link", "set", port, "master", "br0", "up")

    def _configure(
        self, where: list[str], link: str, address: str, mac: str, neighbours: list[Any]
    ) -> None:
        lines = [f"address add {address}/24 dev {link}", f"link set {link} up"]
        lines += [
            f"neigh replace {other} lladdr {other_mac} dev {link} nud permanent"
            for other, other_mac in neighbours
            if other != address
        ]
        _ip(*where, "-batch", "-", stdin="\n".join(lines) + "\n")

    def close(self) -> None:
        """Kill what runs in the namespaces, delete them and the root link; never raises."""
        for host in self.hosts:
            for process in host.processes:
                _stop(process)
            with contextlib.suppress(Exception):
                for pid in host.pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        for netns in [host.netns for host in self.hosts] + [self.bridge_ns]:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.root_link], capture_output=True, timeout=30)


def _stop(process: subprocess.Popen[bytes], grace: float = 1.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


@dataclass(frozen=True)
class Traffic:
    """What a traffic helper sent (payloads in order) and what its sink received, if any."""

    sent: list[bytes]
    received: int | None


def _script(*args: object) -> list[str]:
    return [sys.executable, SCRIPT, *map(str, args)]


def _start_sink(host: Host, *args: object) -> subprocess.Popen[bytes]:
    sink = host.popen(_script(*args), stdout=subprocess.PIPE)
    assert sink.stdout is not None
    ready, _, _ = select.select([sink.stdout], [], [], 10)
    line = sink.stdout.readline() if ready else b""
    if line.strip() != b"ready":
        _stop(sink)
        raise RuntimeError(f"sink on {host.name} did not start: {line!r}")
    return sink


def _sink_result(sink: subprocess.Popen[bytes], timeout: float = 3) -> int:
    """What the sink counted: it ends by itself once all arrived, else it is told to stop."""
    try:
        out, _ = sink.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        sink.terminate()  # some were lost: the sink prints its count on SIGTERM
        out, _ = sink.communicate(timeout=5)
    return int(out.split()[-1]) if out.split() else 0


def _deadline(count: int, rate: int) -> float:
    return count / rate + 10


def udp_traffic(
    src: Host, dst: Host, *, port: int, count: int, rate: int = 1000, size: int = 64,
    src_port: int = 0, sink: bool = True,
) -> Traffic:  # fmt: skip
    """Send `count` numbered UDP datagrams from src to dst:port at most `rate` per second.

    With `sink`, dst receives them (no ICMP port-unreachable in the capture) and counts them.
    """
    receiver = None
    if sink:
        receiver = _start_sink(dst, "udp-sink", dst.address, port, count, _deadline(count, rate))
    src.run(_script("udp-send", dst.address, port, count, rate, size, src_port),
            timeout=_deadline(count, rate))  # fmt: skip
    received = _sink_result(receiver) if receiver else None
    return Traffic([payload(seq, size) for seq in range(count)], received)


def tcp_traffic(
    src: Host, dst: Host, *, port: int, count: int, rate: int = 1000, size: int = 64
) -> Traffic:
    """One TCP connection from src to dst:port carrying `count` numbered messages of `size`
    bytes, each its own send (TCP_NODELAY); the sink reads them all and counts bytes/size."""
    receiver = _start_sink(dst, "tcp-sink", dst.address, port, size, _deadline(count, rate))
    src.run(_script("tcp-send", dst.address, port, count, rate, size),
            timeout=_deadline(count, rate))  # fmt: skip
    return Traffic([payload(seq, size) for seq in range(count)], _sink_result(receiver))


def icmp_traffic(src: Host, dst: Host, *, count: int, rate: int = 100, size: int = 64) -> Traffic:
    """`count` (< 65536) ICMP echo requests from src to dst (id 0xdd, seq 0..count-1, numbered);
    dst's kernel answers each. Python, not `ping -c`: ping is not installed everywhere, and this
    fixes the payload. `received` counts the replies."""
    out = src.run(_script("icmp-send", dst.address, count, rate, size),
                  timeout=_deadline(count, rate)).stdout  # fmt: skip
    return Traffic([payload(seq, size) for seq in range(count)], int(out.split()[-1]))


# ---- a ddump-worker process ----


class WorkerProcess:
    """A `ddump-worker` run as a process (in a namespace, or here); its stderr goes to a file."""

    def __init__(self, argv: Sequence[str], host: Host | None = None, **kwargs: Any) -> None:
        # Closed in __exit__: the file lives as long as the worker.
        self.log_file = tempfile.NamedTemporaryFile(prefix="ddump-worker-", suffix=".log")  # noqa: SIM115
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        if host is None:
            self.process = subprocess.Popen(argv, stderr=self.log_file, **kwargs)
        else:
            self.process = host.popen(argv, stderr=self.log_file, **kwargs)
        self.address = ""
        self._final_log: str | None = None

    def log(self) -> str:
        if self._final_log is not None:
            return self._final_log
        with open(self.log_file.name, encoding="utf-8", errors="replace") as log:
            return log.read()

    def wait_log(self, text: str, timeout: float = 10) -> str:
        """The first log line containing `text`, waiting for it; AssertionError on timeout."""
        end = time.monotonic() + timeout
        while True:
            for line in self.log().splitlines():
                if text in line:
                    return line
            if time.monotonic() > end or self.process.poll() is not None:
                raise AssertionError(f"worker never logged {text!r}; its log:\n{self.log()}")
            time.sleep(0.02)

    def wait_listening(self, timeout: float = 10) -> str:
        """The worker's first listening address (`198.18.0.1:8475`, `unix:/path`)."""
        line = self.wait_log("listening on ", timeout)
        self.address = line.split("listening on ", 1)[1].split()[0]
        return self.address

    def url(self, path: str = "/capture") -> str:
        return f"http://{self.address}{path}"

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 10) -> int:
        """Signal the worker and wait for its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout)
        finally:
            _stop(self.process)

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        _stop(self.process)
        self._final_log = self.log()
        self.log_file.close()


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix socket: `UnixHTTPConnection("/run/w.sock").request("GET", ...)`."""

    def __init__(self, path: str, timeout: float = 10) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def worker_argv(*args: str, python: str = sys.executable) -> list[str]:
    """The command line of a worker run from this checkout: `python -m ddump.worker.main ...`."""
    return [python, "-m", "ddump.worker.main", *args]


# ---- the script run inside namespaces ----


class _Pacer:
    """Sleeps so that `rate` events per second are not exceeded, in batches of ~1 ms."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.start = time.monotonic()

    def wait(self, done: int) -> None:
        ahead = done / self.rate - (time.monotonic() - self.start)
        if ahead > 0.001:
            time.sleep(ahead)


def _udp_send(address: str, port: str, count: str, rate: str, size: str, src_port: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", int(src_port)))
    pacer = _Pacer(int(rate))
    for seq in range(int(count)):
        pacer.wait(seq)
        sock.sendto(payload(seq, int(size)), (address, int(port)))


def _udp_sink(address: str, port: str, count: str, timeout: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, int(port)))
    sock.settimeout(0.1)
    received, end = 0, time.monotonic() + float(timeout)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    try:
        while received < int(count) and time.monotonic() < end:
            with contextlib.suppress(TimeoutError):
                sock.recv(65536)
                received += 1
    finally:
        print(received, flush=True)


def _tcp_send(address: str, port: str, count: str, rate: str, size: str) -> None:
    sock = socket.create_connection((address, int(port)), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pacer = _Pacer(int(rate))
    for seq in range(int(count)):
        pacer.wait(seq)
        sock.sendall(payload(seq, int(size)))
    sock.shutdown(socket.SHUT_WR)
    while sock.recv(4096):
        pass  # wait for the sink's FIN, so that the whole exchange is over on return
    sock.close()


def _tcp_sink(address: str, port: str, size: str, timeout: str) -> None:
    server = socket.create_server((address, int(port)))
    server.settimeout(float(timeout))
    print("ready", flush=True)
    conn, _ = server.accept()
    conn.settimeout(float(timeout))
    total = 0
    while data := conn.recv(65536):
        total += len(data)
    conn.close()
    print(total // int(size), flush=True)


def _icmp_send(address: str, count: str, rate: str, size: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.setblocking(False)
    pacer = _Pacer(int(rate))
    replies: set[int] = set()
    for seq in range(int(count)):
        pacer.wait(seq)
        body = payload(seq, int(size))
        checksum = _checksum(struct.pack("!BBHHH", 8, 0, 0, 0xDD, seq) + body)
        sock.sendto(struct.pack("!BBHHH", 8, 0, checksum, 0xDD, seq) + body, (address, 0))
        replies |= _icmp_replies(sock)
    end = time.monotonic() + 2
    while len(replies) < int(count) and time.monotonic() < end:
        select.select([sock], [], [], 0.1)
        replies |= _icmp_replies(sock)
    print(len(replies), flush=True)


def _icmp_replies(sock: socket.socket) -> set[int]:
    """The sequence numbers of the echo replies waiting on the raw socket."""
    seqs: set[int] = set()
    while True:
        try:
            packet = sock.recv(65536)
        except BlockingIOError:
            return seqs
        icmp = packet[(packet[0] & 0x0F) * 4 :]  # after the IP header
        kind, _, _, ident, seq = struct.unpack_from("!BBHHH", icmp)
        if kind == 0 and ident == 0xDD:
            seqs.add(seq)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _main(argv: list[str]) -> None:
    commands: dict[str, Callable[..., None]] = {
        "udp-send": _udp_send,
        "udp-sink": _udp_sink,
        "tcp-send": _tcp_send,
        "tcp-sink": _tcp_sink,
        "icmp-send": _icmp_send,
    }
    commands[argv[0]](*argv[1:])


if __name__ == "__main__":
    _main(sys.argv[1:])
