"""Safe by default and truthful: where the worker listens unless told, what it says when it is
exposed, who --allow lets in, what /health answers when no capture can start, and which
refusals reach the log.

The pure parts and the process run without root (a fake tcpdump from test_worker_app); the
default address, --allow between namespace peers, a worker without CAP_NET_RAW and a filter
too slow to compile run the real tcpdump as root.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ddump.errors import UsageError
from ddump.worker.listen import (
    DEFAULT_LISTEN,
    TcpListen,
    client_allowed,
    exposed,
    listen_addresses,
    parse_network,
)
from ddump.worker.main import build_parser
from ddump.worker.params import NS_PER_S
from ddump.worker.refusals import RefusalLog
from tests.conftest import require_root, require_tool
from tests.netns import Fleet, WorkerProcess, worker_argv
from tests.test_worker_app import Fake, ThreadWorker, fake_tcpdump

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = REPO / "packaging" / "debian" / "ddump-worker.default"
PORT = 8475

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[Fake]:
    yield from fake_tcpdump(monkeypatch)


def health(address: str) -> tuple[int, dict[str, Any]]:
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=10)
    try:
        connection.request("GET", "/health")
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


# ---- where it listens by default ----


def test_without_listen_the_worker_serves_loopback_only_in_both_families() -> None:
    assert build_parser().parse_args([]).listen is None
    assert listen_addresses(None) == DEFAULT_LISTEN
    assert (TcpListen("127.0.0.1", PORT), TcpListen("::1", PORT)) == DEFAULT_LISTEN
    assert listen_addresses(":9000") == (TcpListen(None, 9000),)


def test_help_says_the_default_and_why() -> None:
    text = " ".join(build_parser().format_help().split())
    assert "Default 127.0.0.1:8475 and [::1]:8475: this host only" in text
    assert "reads every packet of the host" in text
    assert "--allow CIDR" in text


# ---- what counts as exposed, and who --allow lets in ----


@pytest.mark.parametrize(
    ("address", "expected"),
    [("127.0.0.1", []), ("::1", []), ("0.0.0.0", ["0.0.0.0:{port}"]), ("::", ["[::]:{port}"])],
)
def test_any_address_but_loopback_is_exposed(address: str, expected: list[str]) -> None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((address, 0))
        port = sock.getsockname()[1]
        assert exposed([sock]) == [name.format(port=port) for name in expected]


@pytest.mark.parametrize(
    ("peer", "allowed"),
    [
        ("198.51.100.7", True),
        ("10.1.2.3", True),
        ("10.2.0.1", False),
        ("::ffff:10.1.2.3", True),  # an IPv4 client of a dual-stack socket
        ("2001:db8::5", True),
        ("2001:db9::5", False),
        ("127.0.0.1", False),  # loopback is not implied
        ("", False),
    ],
)
def test_allow_admits_only_the_listed_networks(peer: str, allowed: bool) -> None:
    networks = [parse_network(text) for text in ("198.51.100.7", "10.1.0.0/16", "2001:db8::/32")]
    assert client_allowed(peer, networks) is allowed


def test_a_bad_allow_is_a_usage_error_with_an_example() -> None:
    with pytest.raises(UsageError, match=r"--allow '10\.0\.0\.0/33'.*10\.0\.0\.0/8"):
        parse_network("10.0.0.0/33")


# ---- refusals are logged, each, at a bounded rate ----


def test_refusals_are_logged_each_up_to_the_burst_then_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ddump.worker")
    now = [0.0]
    refusals = RefusalLog(burst=3, window_s=10.0, clock=lambda: now[0])
    logged = [refusals.refused(f"refusal {n}") for n in range(5)]
    now[0] = 10.0  # the next window
    logged.append(refusals.refused("refusal 5"))
    lines = [record.getMessage() for record in caplog.records]
    assert logged == [True, True, True, False, False, True]
    assert lines[:3] == ["refusal 0", "refusal 1", "refusal 2"]
    assert "refused 2 more request(s) or connection(s) in 10 s" in lines[3]
    assert "6 refused since the start" in lines[3]
    assert lines[4] == "refusal 5"


def test_refused_captures_are_logged_with_client_filter_and_reason(
    fake: Fake, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ddump.worker")
    with ThreadWorker(fake.path, max_captures=1) as worker:
        assert worker.get("/capture?interface=eth0").status == 400
        assert worker.get("/capture?filter=fake-syntax-error").status == 400
        running = worker.get("/capture?filter=fake-idle")
        assert worker.get("/capture?filter=udp").status == 503
        running.close()
        assert worker.get("/capture/stats?id=nope").status == 404
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    refusals = [line for line in lines if "refused" in line or " from " in line]
    assert len(refusals) == 4, lines
    assert refusals[0].startswith("capture refused (400): client=127.0.0.1 filter=-: ")
    assert "unknown parameter 'interface'" in refusals[0]
    assert "filter='fake-syntax-error': tcpdump rejected the filter" in refusals[1]
    assert (
        "capture refused (503): client=127.0.0.1 filter='udp': too many captures" in (refusals[2])
    )
    assert refusals[3].startswith("404 GET /capture/stats?id=nope from 127.0.0.1")


# ---- the process: warnings at start, /health, --allow ----


def fake_worker(fake: Fake, *args: str) -> WorkerProcess:
    return WorkerProcess(worker_argv("--tcpdump", fake.path, *args))


def test_listening_on_every_address_warns_and_health_says_exposed(fake: Fake) -> None:
    with fake_worker(fake, "--listen", "0.0.0.0:0") as worker:
        port = worker.wait_listening().rsplit(":", 1)[1]
        warning = worker.wait_log("exposed beyond this host")
        status, answer = health(f"127.0.0.1:{port}")
    assert "WARNING" in warning
    assert f"exposed beyond this host on 0.0.0.0:{port} (not loopback): any host" in warning
    assert "can read every packet this host sends or receives" in warning
    assert "Deploying behind nginx" in warning and "--allow" in warning
    assert status == 200
    assert answer["exposed"] is True and answer["exposed_on"] == [f"0.0.0.0:{port}"]
    assert answer["allow"] == []


def test_loopback_and_unix_sockets_are_not_warned_about(fake: Fake) -> None:
    with fake_worker(fake, "--listen", "127.0.0.1:0") as worker:
        status, answer = health(worker.wait_listening())
        assert status == 200 and answer["status"] == "ok"
        assert answer["exposed"] is False and answer["exposed_on"] == []
        log = worker.log()
    with (
        tempfile.TemporaryDirectory() as directory,
        fake_worker(fake, "--listen", f"unix:{directory}/w.sock") as unix,
    ):
        unix.wait_listening()
        unix_log = unix.log()
    assert "exposed" not in log + unix_log


def test_allow_on_a_unix_socket_is_a_usage_error(fake: Fake) -> None:
    with (
        tempfile.TemporaryDirectory() as directory,
        fake_worker(
            fake, "--listen", f"unix:{directory}/w.sock", "--allow", "10.0.0.0/8"
        ) as worker,
    ):
        assert worker.process.wait(10) == 2
    assert "--allow applies to TCP clients" in worker.log()


def test_allow_closes_other_clients_at_once_and_logs_them(fake: Fake) -> None:
    with fake_worker(fake, "--listen", "127.0.0.1:0", "--allow", "192.0.2.0/24") as worker:
        host, port = worker.wait_listening().rsplit(":", 1)
        assert "clients from 192.0.2.0/24 only" in worker.wait_log("listening on")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            assert sock.recv(100) == b""  # closed before a byte was asked or answered
        line = worker.wait_log("closed: not in --allow")
    assert "connection from 127.0.0.1 closed: not in --allow 192.0.2.0/24" in line


def test_health_is_503_with_the_reason_when_no_capture_can_start(
    fake: Fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_TCPDUMP_NO_CAPTURE", "1")
    with fake_worker(fake, "--listen", "127.0.0.1:0") as worker:
        status, answer = health(worker.wait_listening())
        warning = worker.wait_log("cannot capture:")
    assert status == 503
    assert answer["status"] == "error"
    assert "CAP_NET_RAW" in answer["error"] and "permission" in answer["error"]
    assert answer["tcpdump"] == "tcpdump version 4.99.0-fake"
    assert "GET /health answers 503 until this is fixed" in warning


# ---- the defaults file lists every option ----


def worker_options() -> set[str]:
    """Every long option of ddump-worker, from its parser (not --help and --version)."""
    options = {
        option
        for action in build_parser()._actions
        for option in action.option_strings
        if option.startswith("--")
    }
    return options - {"--help", "--version"}


def test_the_defaults_file_lists_every_worker_option() -> None:
    documented = set(re.findall(r"^#\s+(--[a-z][a-z-]*)", DEFAULTS.read_text(), re.MULTILINE))
    assert documented == worker_options()


# ---- the real thing: namespaces, tcpdump, privileges ----


@pytest.fixture
def tcpdump() -> str:
    require_root()
    require_tool("ip")
    return require_tool("tcpdump")


def curl_status(fleet_host: Any, curl: str, url: str) -> tuple[int, str]:
    """(curl's exit status, the HTTP status it got) for GET `url` from inside a namespace."""
    done = fleet_host.run(
        [curl, "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", url],
        check=False,
        timeout=15,
    )
    return done.returncode, done.stdout.decode()


def test_default_answers_on_loopback_and_refuses_a_namespace_peer(tcpdump: str) -> None:
    curl = require_tool("curl")
    with Fleet(2) as fleet:
        h1, h2 = fleet.hosts
        with WorkerProcess(worker_argv("--tcpdump", tcpdump), h1) as worker:
            assert worker.wait_listening() == f"127.0.0.1:{PORT}"
            line = worker.wait_log("listening on")
            local = curl_status(h1, curl, f"http://127.0.0.1:{PORT}/health")
            local6 = curl_status(h1, curl, f"http://[::1]:{PORT}/health")
            peer = curl_status(h2, curl, f"http://{h1.address}:{PORT}/health")
            log = worker.log()
    assert f"listening on 127.0.0.1:{PORT} [::1]:{PORT} " in line
    assert local == (0, "200") and local6 == (0, "200")
    assert peer[0] == 7, peer  # curl: failed to connect (refused)
    assert "exposed" not in log


def test_default_without_ipv6_serves_127_0_0_1_alone(tcpdump: str) -> None:
    curl = require_tool("curl")
    with Fleet(1) as fleet:
        [h1] = fleet.hosts
        h1.run(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])
        h1.run(["sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=1"])
        with WorkerProcess(worker_argv("--tcpdump", tcpdump), h1) as worker:
            line = worker.wait_log("listening on")
            local = curl_status(h1, curl, f"http://127.0.0.1:{PORT}/health")
            log = worker.log()
    assert f"listening on 127.0.0.1:{PORT} (pid" in line
    assert f"[::1]:{PORT} left out: " in log
    assert local == (0, "200")


def test_allow_lets_one_peer_in_and_keeps_another_out(tcpdump: str) -> None:
    curl = require_tool("curl")
    with Fleet(3) as fleet:
        h1, h2, h3 = fleet.hosts
        argv = worker_argv("--tcpdump", tcpdump, "--listen", f":{PORT}", "--allow", h2.address)
        with WorkerProcess(argv, h1) as worker:
            worker.wait_listening()
            warning = worker.wait_log("exposed beyond this host")
            admitted = curl_status(h2, curl, f"http://{h1.address}:{PORT}/health")
            kept_out = curl_status(h3, curl, f"http://{h1.address}:{PORT}/health")
            closed = worker.wait_log("closed: not in --allow")
    assert admitted == (0, "200")
    # curl: an empty reply (52) or a reset (56): closed at once, before its request was read
    assert kept_out[0] in (52, 56) and kept_out[1] == "000", kept_out
    assert f"connection from {h3.address} closed: not in --allow {h2.address}/32" in closed
    assert f"any host in --allow {h2.address}/32 can read every packet" in warning


def test_health_without_cap_net_raw_is_503_naming_the_fix(tcpdump: str) -> None:
    setpriv = require_tool("setpriv")
    nobody = [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups",
              "--inh-caps=-all", "--bounding-set=-all"]  # fmt: skip
    argv = [*nobody, *worker_argv("--tcpdump", tcpdump, "--listen", "127.0.0.1:0")]
    with WorkerProcess(argv, cwd=REPO) as worker:
        status, answer = health(worker.wait_listening())
        warning = worker.wait_log("cannot capture:")
    assert status == 503, answer
    assert answer["status"] == "error"
    assert "permission" in answer["error"] and "AmbientCapabilities=CAP_NET_RAW" in answer["error"]
    assert "CAP_NET_RAW" in warning


def test_a_filter_too_slow_to_compile_is_named_as_the_cause(tcpdump: str) -> None:
    # 350 `host` terms (7 KB, far under the 64 KiB limit) keep libpcap's optimizer busy for
    # seconds; the worker's start timeout is 1 s here instead of 10.
    slow = " or ".join(f"host 10.{n // 250}.{n % 250}.1" for n in range(350))
    with ThreadWorker(tcpdump, start_timeout_ns=NS_PER_S) as worker:
        response = worker.get("/capture?filter=" + slow.replace(" ", "+"))
        text = response.read().decode()
        control = worker.get("/capture?filter=udp+port+9&count=1&duration=0.2")
        control.read()
    assert response.status == 400, text
    assert "the filter is too complex" in text and "still compiling the filter" in text
    assert "did not start listening" not in text
    assert control.status == 200
