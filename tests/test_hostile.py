"""Hostile and broken input against a real worker, and lying servers against the real CLI.

Each case ends with a clear error or a harmless result, and leaves nothing behind: no file
written, no tcpdump running, no packet socket open, a worker that still answers /health, and
on the CLI's side every good record kept.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from ddump.pcap import GLOBAL_HEADER_LEN, PcapHeader, PcapStreamParser
from tests.conftest import require_root, require_tool
from tests.fake_worker import Script, fake_workers, pcap_stream, read_request, sll2_packet
from tests.netns import WorkerProcess, worker_argv

DDUMP = [sys.executable, "-m", "ddump.cli.main"]
MAX_CAPTURES = 3
ESCAPE_TARGET = Path(f"/tmp/ddump-hostile-{os.getpid()}")  # what an escaped filter would write
SILENT = "udp port 9 and udp port 7"  # compiles, matches nothing here
T0 = time.time_ns() // 1000 * 1000


# ---- the worker and what it holds ----


@dataclass(frozen=True)
class Worker:
    process: WorkerProcess
    host: str
    port: int

    @property
    def pid(self) -> int:
        return self.process.process.pid

    def url(self, query: str = "") -> str:
        return f"http://{self.host}:{self.port}/capture" + (f"?{query}" if query else "")


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    require_root()
    require_tool("tcpdump")
    argv = worker_argv("--listen", "127.0.0.1:0", "--max-captures", str(MAX_CAPTURES))
    with WorkerProcess(argv) as process:
        host, port = process.wait_listening().rsplit(":", 1)
        yield Worker(process, host, int(port))


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (the worker's tcpdumps)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def packet_sockets(pids: list[int]) -> set[int]:
    """The /proc/net/packet sockets (inodes) that `pids` hold open."""
    with open("/proc/net/packet") as table:
        inodes = {int(line.split()[-1]) for line in table.readlines()[1:]}
    held = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                held.add(int(target[8:-1]))
    return inodes & held


def health(worker: Worker, timeout: float = 2.0) -> dict[str, object]:
    connection = http.client.HTTPConnection(worker.host, worker.port, timeout=timeout)
    try:
        connection.request("GET", "/health")
        response = connection.getresponse()
        assert response.status == 200
        answer: dict[str, object] = json.loads(response.read())
        return answer
    finally:
        connection.close()


def assert_nothing_left(worker: Worker, timeout: float = 10.0) -> None:
    """The worker answers, runs no tcpdump and holds no packet socket (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        tcpdumps = children(worker.pid)
        sockets = packet_sockets([worker.pid, *tcpdumps])
        if not tcpdumps and not sockets:
            break
        assert time.monotonic() < deadline, f"left running: {tcpdumps}, sockets {sockets}"
        time.sleep(0.05)
    # A client that left a shared tcpdump takes its counts as that tcpdump ends: its response
    # is over a moment after.
    while (running := health(worker)["captures"]) != 0:
        assert time.monotonic() < deadline, f"{running} captures still counted"
        time.sleep(0.05)
    assert not ESCAPE_TARGET.exists()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def get(worker: Worker, query: str, *, read: int = 4096) -> Answer:
    """GET /capture?QUERY (sent as given); a 200's body is read for `read` bytes, then closed."""
    connection = http.client.HTTPConnection(worker.host, worker.port, timeout=10)
    try:
        connection.request("GET", f"/capture?{query}")
        response = connection.getresponse()
        body = response.read(read) if response.status == 200 else response.read()
        return Answer(response.status, dict(response.getheaders()), body)
    finally:
        connection.close()


# ---- filters that try to escape ----


ESCAPES = [
    f"-w {ESCAPE_TARGET}",
    f"-z /bin/touch -w {ESCAPE_TARGET}",
    "--",
    f"-- -w {ESCAPE_TARGET}",
    f"icmp; touch {ESCAPE_TARGET}",
    f"$(touch {ESCAPE_TARGET})",
    f"`touch {ESCAPE_TARGET}`",
    f"icmp | touch {ESCAPE_TARGET}",
    f"icmp && touch {ESCAPE_TARGET} &",
    f"icmp\ntouch {ESCAPE_TARGET}",
    "icmp\nFORGED ddump-worker INFO: capture 99 start",  # a log line of our own making
    "icmp\nor udp",
    "icmp\x00-w /tmp/x",
    "icmp) or (tcp",
    "(icmp",
    ")",
    "icmp) or ((tcp",
]


@pytest.mark.parametrize("bpf", ESCAPES, ids=[repr(e)[:40] for e in ESCAPES])
def test_filter_cannot_escape_into_tcpdump_options_or_a_shell(worker: Worker, bpf: str) -> None:
    answer = get(worker, "filter=" + quote(bpf, safe=""), read=GLOBAL_HEADER_LEN)

    if answer.status == 200:  # a harmless capture: pcap, of a filter BPF could read
        assert PcapHeader.parse(answer.body).linktype in (113, 276)
    else:
        assert answer.status == 400
        assert answer.headers["Content-Type"].startswith("text/plain")
        message = answer.body.decode()
        assert message.count("\n") == 1 and len(message) < 500, message
        assert re.search(r"syntax error|NUL|unbalanced parentheses|rejects all", message)
    assert not any(line.startswith("FORGED") for line in worker.process.log().splitlines())
    assert_nothing_left(worker)


@pytest.mark.parametrize(
    "bpf",
    ["udp port {udp} or tcp port {port}", "(udp port {udp}) or (tcp port {port})",
     "not tcp port 1 or tcp port {port}"],
)  # fmt: skip
def test_filter_that_reincludes_the_worker_port_captures_none_of_it(
    worker: Worker, tmp_path: Path, bpf: str
) -> None:
    """The capture's own stream is on the worker's port, and /health is polled during it."""
    out = tmp_path / "out.pcap"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        udp = sink.getsockname()[1]
        query = "filter=" + quote(bpf.format(udp=udp, port=worker.port), safe="")
        cli = subprocess.Popen(
            [*DDUMP, "-w", str(out), "--duration", "1500ms", worker.url(query)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            while cli.poll() is None:
                sender.sendto(b"ddump-hostile", ("127.0.0.1", udp))
                health(worker)
                time.sleep(0.02)
        _, stderr = cli.communicate(timeout=30)

    assert cli.returncode == 0, stderr
    assert read_back(out, f"udp port {udp}") > 0
    assert read_back(out, f"tcp port {worker.port}") == 0
    assert_nothing_left(worker)


def read_back(pcap: Path, bpf: str) -> int:
    """How many packets of `pcap` match `bpf`, as tcpdump reads them."""
    result = subprocess.run(
        ["tcpdump", "-nn", "-r", str(pcap), bpf],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return len(result.stdout.splitlines())


def test_hundred_kilobyte_filter_gets_a_400_not_a_reset(worker: Worker) -> None:
    """The worker caps filters at 64 KiB; a longer one must get that message, whatever the
    HTTP layer's own header limit (today Tornado's 64 KiB cuts the connection first)."""
    bpf = "udp port 1 or " * 7000 + "udp port 2"  # 98 kB
    try:
        answer = get(worker, "filter=" + quote(bpf, safe=""))
    except (ConnectionError, http.client.HTTPException) as error:
        pytest.fail(f"the worker cut the connection instead of answering 400: {error!r}")

    assert answer.status == 400
    assert b"limit" in answer.body
    assert_nothing_left(worker)


@pytest.mark.parametrize(
    ("query", "message"),
    [("filter=%ff%fe", b"not valid UTF-8"), ("filter=%c0%af", b"not valid UTF-8"),
     ("filter=icmp&filter=udp", b"given 2 times"), ("interface=eth0", b"unknown parameter"),
     ("snaplen=-1", b"snaplen"), ("count=99999999999999999999", b"count"),
     ("duration=1e999999999", b"duration")],
)  # fmt: skip
def test_malformed_query_gets_a_400_that_says_why(
    worker: Worker, query: str, message: bytes
) -> None:
    answer = get(worker, query)

    assert answer.status == 400
    assert message in answer.body
    assert_nothing_left(worker)


def test_escaping_filter_through_the_cli_is_reported_with_the_target(
    worker: Worker, tmp_path: Path
) -> None:
    out = tmp_path / "out.pcap"
    result = subprocess.run(
        [*DDUMP, "-w", str(out), f"--filter=-w {ESCAPE_TARGET}", worker.url()],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )  # fmt: skip

    assert result.returncode == 1
    assert f"{worker.host}:{worker.port}: HTTP 400" in result.stderr
    assert "syntax error" in result.stderr
    assert len(out.read_bytes()) == GLOBAL_HEADER_LEN
    assert_nothing_left(worker)


# ---- too many, vanishing, silent and slow clients ----


class OpenCapture:
    """A capture request on a raw socket; the test decides when (and how) it goes away."""

    def __init__(self, worker: Worker, bpf: str = SILENT) -> None:
        self.sock = socket.create_connection((worker.host, worker.port), timeout=10)
        query = "filter=" + quote(bpf, safe="")
        self.sock.sendall(f"GET /capture?{query} HTTP/1.1\r\nHost: w\r\n\r\n".encode())

    def head(self) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            piece = self.sock.recv(4096)
            if not piece:
                break
            data += piece
        return data

    def close(self, *, reset: bool = False) -> None:
        if reset:  # RST instead of FIN
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def test_captures_over_the_limit_get_503_with_retry_after(worker: Worker) -> None:
    running = [OpenCapture(worker) for _ in range(MAX_CAPTURES)]
    try:
        heads = [capture.head() for capture in running]
        refused = get(worker, "filter=icmp")
    finally:
        for capture in running:
            capture.close()

    assert all(head.startswith(b"HTTP/1.1 200") for head in heads)
    assert refused.status == 503
    assert refused.headers.get("Retry-After", "").isdigit()
    assert b"--max-captures" in refused.body
    assert_nothing_left(worker)
    assert get(worker, "filter=icmp", read=GLOBAL_HEADER_LEN).status == 200


@pytest.mark.parametrize(
    ("wait_for_headers", "reset"),
    [(False, False), (False, True), (True, False), (True, True)],
    ids=["fin-before-headers", "rst-before-headers", "fin-after-headers", "rst-after-headers"],
)
def test_clients_that_vanish_leave_no_tcpdump(
    worker: Worker, wait_for_headers: bool, reset: bool
) -> None:
    for _ in range(2):
        batch = [OpenCapture(worker) for _ in range(MAX_CAPTURES)]
        for capture in batch:
            if wait_for_headers:
                assert capture.head().startswith(b"HTTP/1.1 200")
            capture.close(reset=reset)
        health(worker)  # answers at once, while the worker cleans up
        assert_nothing_left(worker)


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_client_that_never_reads_makes_tcpdump_drop_not_the_worker_grow(worker: Worker) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        udp = sink.getsockname()[1]
        stalled = OpenCapture(worker, f"udp port {udp}")
        assert stalled.head().startswith(b"HTTP/1.1 200")
        before = vm_rss_kib(worker.pid)
        slowest = 0.0
        datagram = b"x" * 1400
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for round_ in range(40):  # 40 x 1000 x 1400 bytes: 56 MB the client never reads
                for _ in range(1000):
                    sender.sendto(datagram, ("127.0.0.1", udp))
                if round_ % 8 == 0:
                    started = time.monotonic()
                    health(worker)
                    slowest = max(slowest, time.monotonic() - started)
        grown_kib = vm_rss_kib(worker.pid) - before
        stalled.close()

    assert slowest < 1.0
    assert grown_kib < 16 * 1024, f"the worker grew by {grown_kib} KiB"
    assert_nothing_left(worker)
    end = worker.process.wait_log(f"filter='udp port {udp}' duration=")
    assert "reason=client closed" in end


def test_slowloris_half_requests_do_not_block_the_worker(worker: Worker) -> None:
    half = b"GET /capture?filter=icmp HTTP/1.1\r\nHost: w\r\nX-Slow: "
    clients = []
    try:
        for _ in range(100):
            sock = socket.create_connection((worker.host, worker.port), timeout=10)
            sock.sendall(half)
            clients.append(sock)
        for _ in range(5):
            for sock in clients[:10]:
                sock.sendall(b"a")  # a byte now and then, never the end of the headers
            started = time.monotonic()
            answer = health(worker)
            assert time.monotonic() - started < 1.0
            assert answer["captures"] == 0  # no tcpdump for a request that never finished
            time.sleep(0.05)
    finally:
        for sock in clients:
            sock.close()

    assert_nothing_left(worker)


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_a_connection_flood_cannot_use_up_the_workers_descriptors() -> None:
    # With 128 descriptors and 4 captures the worker keeps at most 128 - 64 - 4 * 6 = 40
    # connections: more are closed at once. Without a bound the 200 below would make accept()
    # fail with EMFILE on every turn of the event loop (a busy spin) and nothing could start.
    require_root()
    require_tool("tcpdump")

    def few_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    argv = worker_argv("--listen", "127.0.0.1:0", "--max-captures", "4")
    with WorkerProcess(argv, preexec_fn=few_descriptors) as process:
        host, port = process.wait_listening().rsplit(":", 1)
        assert "at most 4 captures, 40 connections" in process.log()
        flood = []
        try:
            for _ in range(200):
                flood.append(socket.create_connection((host, int(port)), timeout=5))
            time.sleep(0.5)
            before = cpu_ticks(process.process.pid)
            time.sleep(1.0)
            spent = cpu_ticks(process.process.pid) - before
            closed = 0
            for sock in flood:
                sock.settimeout(0.01)
                with contextlib.suppress(TimeoutError):
                    closed += sock.recv(1) == b""
            process.wait_log("the --max-connections limit: closing new ones")
        finally:
            for sock in flood:
                sock.close()
        assert closed == 160, closed  # all but the 40 kept
        assert spent < 30, spent  # not spinning (ticks of 10 ms in one second)
        time.sleep(0.5)
        connection = http.client.HTTPConnection(host, int(port), timeout=5)
        connection.request("GET", "/health")
        assert connection.getresponse().status == 200
        connection.close()


# ---- who the worker runs as ----


def test_worker_as_root_warns_that_it_needs_only_cap_net_raw(worker: Worker) -> None:
    warning = worker.process.wait_log("running as root")

    assert "WARNING" in warning and "CAP_NET_RAW" in warning


def test_worker_as_nobody_with_only_ambient_cap_net_raw_captures() -> None:
    require_root()
    require_tool("tcpdump")
    setpriv = require_tool("setpriv")
    argv = [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups",
            "--inh-caps=-all,+net_raw", "--ambient-caps=+net_raw", "--bounding-set=-all,+net_raw",
            *worker_argv("--listen", "127.0.0.1:0")]  # fmt: skip
    with WorkerProcess(argv, cwd=Path(__file__).resolve().parents[1]) as process:
        host, port = process.wait_listening().rsplit(":", 1)
        nobody = Worker(process, host, int(port))
        answer = get(nobody, "filter=icmp", read=GLOBAL_HEADER_LEN)
        log = process.log()

    assert answer.status == 200, answer.body
    assert PcapHeader.parse(answer.body).nano
    assert "running as root" not in log


# ---- servers that lie to the CLI ----


@dataclass
class Run:
    status: int
    pcap: bytes
    stderr: str
    max_rss_kib: int

    def payloads(self) -> list[bytes]:
        parser = PcapStreamParser()
        records = parser.feed(self.pcap)
        parser.close()
        return [data[16 + 20 :] for _, data in records]  # after record and SLL2 headers


def run_ddump(url: str, tmp_path: Path, *args: str, duration: str = "20s") -> Run:
    """The CLI as a child whose peak memory is measured (wait4)."""
    out = tmp_path / "out.pcap"
    with open(tmp_path / "stderr.txt", "w+b") as stderr:
        proc = subprocess.Popen(
            [*DDUMP, "-w", str(out), "--duration", duration, *args, url],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.01)
        proc.returncode = os.waitstatus_to_exitcode(status)
        stderr.seek(0)
        text = stderr.read().decode(errors="replace")
    return Run(proc.returncode, out.read_bytes(), text, usage.ru_maxrss)


def good_records(*names: bytes) -> bytes:
    """Records (no global header) of SLL2 frames carrying `names`, 1 µs apart."""
    stream = pcap_stream([(T0 + i * 1000, sll2_packet(name)) for i, name in enumerate(names)])
    return stream[GLOBAL_HEADER_LEN:]


HEADER = PcapHeader(linktype=276).to_bytes()  # snaplen 262144, little-endian, nanoseconds


def record_header(caplen: int) -> bytes:
    return struct.pack("<IIII", T0 // 10**9 + 1, 0, caplen, caplen)


def test_truncated_pcap_header_is_reported_with_the_target(tmp_path: Path) -> None:
    with fake_workers({"/capture": Script(body=[HEADER[:10]])}) as (fake,):
        run = run_ddump(fake.url(), tmp_path)

    assert run.status == 1
    assert f"127.0.0.1:{fake.port}: " in run.stderr
    assert "pcap global header" in run.stderr
    assert len(run.pcap) == GLOBAL_HEADER_LEN


@pytest.mark.parametrize("caplen", [262145, 0xFFFFFFFF], ids=["over-snaplen", "absurd"])
def test_record_larger_than_the_snaplen_ends_the_stream_keeping_good_records(
    tmp_path: Path, caplen: int
) -> None:
    body = [HEADER + good_records(b"one", b"two"), 0.2, record_header(caplen) + b"\0" * 64]
    with fake_workers({"/capture": Script(body=body, end="hang")}) as (fake,):
        run = run_ddump(fake.url(), tmp_path)

    assert run.status == 1
    assert f"127.0.0.1:{fake.port}: " in run.stderr and f"caplen {caplen}" in run.stderr
    assert run.payloads() == [b"one", b"two"]


@pytest.mark.parametrize(
    "lie",
    [record_header(262145), record_header(0xFFFFFFFF) + b"\0" * 64,
     b"<html><head><title>502 Bad Gateway</title></head></html>\r\n" * 4],
    ids=["over-snaplen", "absurd-caplen", "html-garbage"],
)  # fmt: skip
def test_good_records_in_the_same_chunk_as_a_lie_are_kept(tmp_path: Path, lie: bytes) -> None:
    """One read can hold good records and then the corruption: the good ones are kept."""
    body = [HEADER + good_records(b"one", b"two", b"three") + lie]
    with fake_workers({"/capture": Script(body=body)}) as (fake,):
        run = run_ddump(fake.url(), tmp_path)

    assert run.status == 1
    assert f"127.0.0.1:{fake.port}: " in run.stderr
    assert run.payloads() == [b"one", b"two", b"three"]


def test_garbage_after_valid_records_ends_the_stream_keeping_them(tmp_path: Path) -> None:
    garbage = b"<html><head><title>502 Bad Gateway</title></head></html>\r\n" * 4
    body = [HEADER + good_records(b"one", b"two"), 0.2, garbage]
    with fake_workers({"/capture": Script(body=body)}) as (fake,):
        run = run_ddump(fake.url(), tmp_path)

    assert run.status == 1
    assert f"127.0.0.1:{fake.port}: record 3: caplen" in run.stderr
    assert "the stream is corrupt or not pcap" in run.stderr
    assert run.payloads() == [b"one", b"two"]


def test_caplen_over_a_small_snaplen_but_within_the_maximum_is_cut_to_the_snaplen(
    tmp_path: Path,
) -> None:
    """The decision (ddump/pcap.py): a record is refused only past max(snaplen, 262144); below
    that, one longer than the stream's snaplen is cut to it, as libpcap 1.10 does reading it."""
    small = PcapHeader(linktype=276, snaplen=64).to_bytes()
    with fake_workers({"/capture": Script(body=[small + good_records(b"x" * 200)])}) as (fake,):
        run = run_ddump(fake.url("/capture?count=1"), tmp_path)  # it ends as asked

    assert run.status == 0, run.stderr
    assert run.payloads() == [b"x" * (64 - 20)]  # the SLL2 header is 20 bytes
    assert "1 longer than the snaplen, cut to it" in run.stderr
    require_tool("tcpdump")
    assert read_back(tmp_path / "out.pcap", "") == 1


def test_lying_caplen_followed_by_a_flood_does_not_grow_the_cli(tmp_path: Path) -> None:
    megabyte = b"\xff" * 2**20
    body: list[bytes | float] = [HEADER + good_records(b"one"), 0.2, record_header(2**31)]
    body += [megabyte] * 256  # a quarter of a gigabyte the CLI must not keep
    with fake_workers({"/capture": Script(body=[HEADER[:10]])}) as (plain,):
        baseline = run_ddump(plain.url(), tmp_path)
    with fake_workers({"/capture": Script(body=body)}) as (fake,):
        started = time.monotonic()
        run = run_ddump(fake.url(), tmp_path)
        elapsed = time.monotonic() - started

    assert run.status == 1 and run.payloads() == [b"one"]
    assert run.max_rss_kib < baseline.max_rss_kib + 32 * 1024
    assert elapsed < 10


class RawServer:
    """Answers one connection with exact bytes, then closes it: HTTP framing that lies."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(20)
        self.port: int = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        try:
            connection, _ = self.listener.accept()
        except OSError:
            return
        with connection:
            connection.settimeout(10)
            if read_request(connection) is None:
                return
            connection.sendall(self.answer)

    def __enter__(self) -> RawServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.listener.close()
        self.thread.join(20)


PCAP_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.tcpdump.pcap\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@pytest.mark.parametrize(
    ("tail", "message", "kept"),
    [(b"1000\r\n" + good_records(b"cut")[:30], "connection lost mid-stream", []),
     (b"zz\r\n", "malformed chunked body", []),
     # the chunk's data was whole, only its CRLF is wrong: the record in it is good
     (chunk(good_records(b"cut"))[:-2] + b"XX", "does not end with CRLF", [b"cut"]),
     (chunk(good_records(b"cut")[:30]), "stream cut mid-record", [])],
    ids=["cut-inside-a-chunk", "bad-chunk-size", "bad-chunk-end", "clean-end-inside-a-record"],
)  # fmt: skip
def test_chunked_stream_cut_or_malformed_keeps_the_records_before_it(
    tmp_path: Path, tail: bytes, message: str, kept: list[bytes]
) -> None:
    before = chunk(HEADER + good_records(b"one", b"two"))
    if message == "stream cut mid-record":
        tail += b"0\r\n\r\n"  # a clean HTTP end, inside a pcap record
    with RawServer(PCAP_HEAD + before + tail) as server:
        run = run_ddump(f"http://127.0.0.1:{server.port}/capture", tmp_path)

    assert run.status == 1
    assert f"127.0.0.1:{server.port}: " in run.stderr and message in run.stderr
    # "cut" has the same timestamp as "one": where it lands depends on how the reads split
    assert sorted(run.payloads()) == sorted([b"one", b"two", *kept])


def test_error_response_that_never_ends_is_reported_without_waiting(tmp_path: Path) -> None:
    """A 503 whose body never finishes must not hold the CLI until --duration."""
    script = Script(status=503, body=[b"busy, try later\n"], end="hang")
    with fake_workers({"/capture": script}) as (fake,):
        started = time.monotonic()
        run = run_ddump(fake.url(), tmp_path, duration="6s")
        elapsed = time.monotonic() - started

    assert run.status == 1
    assert "HTTP 503" in run.stderr and "busy, try later" in run.stderr
    assert elapsed < 5, "the CLI waited for the end of an error body"


def test_filter_with_crlf_cannot_inject_request_headers(tmp_path: Path) -> None:
    with fake_workers({"/capture": Script(body=[HEADER], end="hang")}) as (fake,):
        injection = "icmp\r\nX-Injected: yes\r\n"
        run = run_ddump(fake.url(), tmp_path, "--filter", injection, duration="0.5")

    assert run.status == 0, run.stderr
    _, headers = fake.requests[-1]
    assert "X-Injected" not in headers


@pytest.mark.parametrize("stop", ["duration", "sigint"])
def test_target_stuck_in_the_tls_handshake_does_not_delay_the_stop(
    tmp_path: Path, stop: str
) -> None:
    """A server that accepts TCP and never answers the ClientHello (here: never even accepts)
    must not hold ddump past --duration or Ctrl-C until --connect-timeout (6 s) runs out."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"https://127.0.0.1:{silent.getsockname()[1]}/capture"
        limit = ["--duration", "1s"] if stop == "duration" else []
        args = [*DDUMP, "-w", str(tmp_path / "out.pcap"), "--connect-timeout", "6s", *limit, url]
        started = time.monotonic()
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if stop == "sigint":
            # A pending connection: ddump is past start-up, its signal handlers are in place.
            assert select.select([silent], [], [], 10)[0], "ddump never connected"
            time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
        try:
            _, stderr = proc.communicate(timeout=30)
        finally:
            proc.kill()
        elapsed = time.monotonic() - started

    assert "Traceback" not in stderr.decode() and "usage" not in stderr.decode()
    assert elapsed < 4, f"took {elapsed:.1f} s to stop: {stderr.decode()}"
