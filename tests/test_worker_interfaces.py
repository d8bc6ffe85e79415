"""The worker's X-Ddump-Interfaces header: its format, its size cap, and real workers sending it."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ddump.pcap import PcapStreamParser, Record
from ddump.pcapng import PcapngWriter, parse_interfaces_header, section_header
from ddump.worker.interfaces import (
    INTERFACES_HEADER,
    MAX_VALUE_BYTES,
    format_interfaces,
    interfaces_header,
)
from tests.conftest import require_root, require_tool
from tests.netns import Fleet, Host, WorkerProcess, worker_argv
from tests.test_worker_app import Fake, ThreadWorker
from tests.test_worker_app import fake as fake  # a fixture: pytest finds it by this name


def test_the_map_is_index_equals_name_in_index_order() -> None:
    assert format_interfaces([(2, "eth0"), (1, "lo"), (10, "br-0a1b")]) == "1=lo,2=eth0,10=br-0a1b"


def test_names_are_percent_encoded_bytes_and_parse_back() -> None:
    odd = os.fsdecode(b"x\xff")  # not UTF-8: the kernel allows any byte but '/', ':', space
    interfaces = [(3, "a,b=c%"), (4, "café"), (5, odd), (6, "eth0.100~x_y-z")]
    value = format_interfaces(interfaces)
    assert value == "3=a%2Cb%3Dc%25,4=caf%C3%A9,5=x%FF,6=eth0.100~x_y-z"
    assert value.isascii() and " " not in value
    assert parse_interfaces_header(value) == {
        3: "a,b=c%",
        4: "café",
        5: "x\ufffd",
        6: "eth0.100~x_y-z",
    }


def test_a_map_too_large_for_a_proxy_keeps_the_lowest_indexes_and_says_it_was_cut() -> None:
    interfaces = [(1, "lo"), (2, "eth0")] + [(i, f"veth{i:08x}") for i in range(100, 400)]
    value = format_interfaces(interfaces)
    assert len(value) <= MAX_VALUE_BYTES
    assert value.startswith("1=lo,2=eth0,100=veth00000064,")
    assert value.endswith(",...")
    parsed = parse_interfaces_header(value)
    assert list(parsed) == [index for index, _ in interfaces][: len(parsed)]
    assert len(parsed) > 50
    assert format_interfaces(interfaces, limit=20) == "1=lo,2=eth0,..."


def test_a_map_that_just_fits_is_not_cut() -> None:
    value = format_interfaces([(1, "lo"), (2, "eth0")], limit=len("1=lo,2=eth0"))
    assert value == "1=lo,2=eth0"


def test_the_header_describes_this_network_namespace() -> None:
    assert parse_interfaces_header(interfaces_header()) == dict(socket.if_nameindex())


@contextlib.contextmanager
def closing(worker: ThreadWorker, bpf: str) -> Iterator[http.client.HTTPResponse]:
    """GET /capture?filter=BPF; the connection is closed afterwards (the capture stops)."""
    connection = http.client.HTTPConnection("127.0.0.1", worker.port, timeout=10)
    try:
        connection.request("GET", f"/capture?filter={bpf}")
        yield connection.getresponse()
    finally:
        connection.close()


def test_a_capture_response_carries_the_map_taken_at_its_start(fake: Fake) -> None:
    with ThreadWorker(fake.path) as worker, closing(worker, "fake-idle") as response:
        assert response.status == 200
        value = response.getheader(INTERFACES_HEADER, "")
        assert parse_interfaces_header(value) == dict(socket.if_nameindex())


def test_refused_captures_carry_no_map(fake: Fake) -> None:
    with ThreadWorker(fake.path) as worker, closing(worker, "fake-syntax-error") as response:
        assert response.status == 400
        assert response.getheader(INTERFACES_HEADER) is None


# ---- a real worker in a network namespace ----


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    require_root()
    require_tool("ip")
    require_tool("tcpdump")
    with Fleet(1) as created:
        yield created


@pytest.mark.timeout(60)
def test_a_worker_in_a_namespace_names_that_namespaces_interfaces(fleet: Fleet) -> None:
    [host] = fleet.hosts
    links = host.run(["ip", "-o", "link", "show"]).stdout.decode()
    expected = {int(i): name for i, name in re.findall(r"^(\d+): ([^:@]+)[:@]", links, re.M)}
    assert expected.get(1) == "lo" and "eth0" in expected.values()
    with WorkerProcess(worker_argv("--listen", ":8475"), host) as worker:
        worker.wait_listening()
        connection = http.client.HTTPConnection(host.address, 8475, timeout=10)
        connection.request("GET", "/capture?filter=udp+port+9")
        response = connection.getresponse()
        assert response.status == 200
        assert parse_interfaces_header(response.getheader(INTERFACES_HEADER, "")) == expected
        connection.close()


def send_udp(host: Host, address: str, payload: bytes, count: int) -> None:
    """`count` datagrams to address:5000, sent from inside `host`."""
    script = (
        "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "for _ in range(int(sys.argv[3])): s.sendto(sys.argv[2].encode(), (sys.argv[1], 5000))"
    )
    host.run([sys.executable, "-c", script, address, payload.decode(), str(count)])


@pytest.mark.timeout(60)
def test_sll2_packets_land_in_the_block_of_the_interface_that_saw_them(
    fleet: Fleet, tmp_path: Path
) -> None:
    tshark = require_tool("tshark")
    [host] = fleet.hosts
    with WorkerProcess(worker_argv("--listen", ":8475"), host) as worker:
        worker.wait_listening()
        connection = http.client.HTTPConnection(host.address, 8475, timeout=10)
        connection.request("GET", "/capture?filter=udp+port+5000")
        response = connection.getresponse()
        assert response.status == 200
        names = parse_interfaces_header(response.getheader(INTERFACES_HEADER, ""))
        parser = PcapStreamParser()
        records: list[Record] = []

        def read() -> None:
            with contextlib.suppress(OSError, ValueError, http.client.HTTPException):
                while chunk := response.read1(65536):
                    records.extend(parser.feed(chunk))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:  # arrives on eth0
            for _ in range(3):
                sock.sendto(b"from-outside", (host.address, 5000))
        send_udp(host, "127.0.0.1", b"on-loopback", 3)  # stays on lo
        end = time.monotonic() + 10
        while sum(b"on-loopback" in r for _, r in records) < 3 or len(records) < 6:
            assert time.monotonic() < end, f"only {len(records)} packets captured"
            time.sleep(0.01)
        assert connection.sock is not None
        connection.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader; the worker sees the FIN
        reader.join(10)
        connection.close()
    assert parser.header is not None
    writer = PcapngWriter()
    writer.start_target(
        0,
        name="h1",
        description=f"http://{host.address}:8475/capture?filter=udp%20port%205000",
        linktype=parser.header.linktype,
        snaplen=parser.header.snaplen,
        interface_names=names,
    )
    epbs = writer.encode(0, list(records))
    data = section_header("ddump test") + writer.take_blocks() + b"".join(e for _, e in epbs)
    (tmp_path / "h1.pcapng").write_bytes(data + writer.statistics(time.time_ns()))
    fields = ["-T", "fields", "-e", "frame.interface_name", "-e", "udp.payload"]
    argv = [tshark, "-r", str(tmp_path / "h1.pcapng"), *fields]
    shown = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
    lines = [line.split("\t") for line in shown.stdout.splitlines()]
    where = {(name, bytes.fromhex(payload.replace(":", ""))) for name, payload in lines}
    assert where == {("h1:eth0", b"from-outside"), ("h1:lo", b"on-loopback")}
