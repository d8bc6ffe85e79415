"""The shipped nginx site in front of a real worker, driven by the real `ddump` CLI.

Every case goes ddump (subprocess) -> nginx (configs/nginx/ddump-worker.conf, rewritten only
for ports and paths) -> ddump-worker -> tcpdump capturing numbered UDP datagrams on loopback.
Every case runs with -v, and none may print the password.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import socket
import ssl
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
from tests.certs import Pki, make_pki
from tests.conftest import require, require_root, require_tool
from tests.fake_worker import FakeWorker, Script, pcap_stream, sll2_packet
from tests.netns import WorkerProcess, worker_argv
from tests.nginx import SHIPPED_SITE, Nginx, Site, SiteFiles, free_port, htpasswd_line, shipped_site

USER = "ops"
PASSWORD = "Tr0ub4dor&3 p@ss:w/rd"  # needs percent-encoding in a URL
WRONG_PASSWORD = "not-the-Pa55word"
PASSWORD_ENV = "DDUMP_TEST_NGINX_PASSWORD"
MARK = b"ddump-secure-access "
DDUMP = Path(sys.executable).with_name("ddump")
RUN_TIMEOUT_S = 30


def secrets_of(password: str) -> list[str]:
    """Every form a leaked password could take in a message."""
    basic = base64.b64encode(f"{USER}:{password}".encode()).decode()
    return [password, quote(password, safe=""), quote(password), basic]


@dataclass
class Result:
    status: int
    stdout: bytes
    stderr: str

    def records(self) -> list[bytes]:
        parser = PcapStreamParser()
        records = parser.feed(self.stdout)
        parser.close()
        return [data for _, data in records]

    def assert_no_secret(self) -> None:
        for password in (PASSWORD, WRONG_PASSWORD):
            for secret in secrets_of(password):
                assert secret not in self.stderr, f"password printed: {self.stderr}"
                assert secret.encode() not in self.stdout, "password in the capture"

    def assert_captured(self, count: int) -> None:
        assert self.status == 0, self.stderr
        records = self.records()
        assert len(records) == count, self.stderr
        assert all(MARK in data for data in records)

    def assert_empty_pcap(self) -> None:
        """What a failed run leaves on stdout: a valid pcap with no record, 24 bytes."""
        assert len(self.stdout) == GLOBAL_HEADER_LEN
        assert PcapHeader.parse(self.stdout).nano
        assert self.records() == []


class UdpTraffic:
    """Numbered datagrams to a bound loopback port, every 20 ms, while a test needs them."""

    def __init__(self) -> None:
        self.sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sink.bind(("127.0.0.1", 0))
        self.port: int = self.sink.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._send, daemon=True)

    def _send(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
            seq = 0
            while not self._stop.wait(0.02):
                out.sendto(MARK + b"%08d" % seq, ("127.0.0.1", self.port))
                seq += 1

    def __enter__(self) -> UdpTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sink.close()


def ddump(*args: str, env: dict[str, str] | None = None) -> Result:
    """The real CLI, verbose, stdout a pipe; numbered UDP traffic flows while it runs."""
    environ = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    with UdpTraffic() as traffic:
        argv = [str(DDUMP), "-v", "--duration", "20s", "--filter", f"udp port {traffic.port}"]
        proc = subprocess.run(
            [*argv, *args],
            capture_output=True,
            timeout=RUN_TIMEOUT_S,
            env={**environ, **(env or {})},
            stdin=subprocess.DEVNULL,
        )
    return Result(proc.returncode, proc.stdout, proc.stderr.decode(errors="replace"))


@dataclass(frozen=True)
class Proxy:
    """One worker on a unix socket behind four copies of the shipped site."""

    pki: Pki
    directory: Path
    worker: WorkerProcess
    nginx: Nginx
    tls: Site  # TLS only
    mtls: Site  # TLS, client certificate required
    auth: Site  # TLS, Basic Auth required
    shipped: Site  # as shipped: client certificate and Basic Auth

    def url(self, site: Site, userinfo: str = "", host: str = "localhost") -> str:
        return f"https://{userinfo}{host}:{site.port}/capture"

    def captures_started(self) -> int:
        return self.worker.log().count(" start: ")


def make_files(directory: Path) -> tuple[Pki, SiteFiles]:
    pki = make_pki(directory / "pki")
    htpasswd = directory / "htpasswd"
    htpasswd.write_text(htpasswd_line(USER, PASSWORD))
    return pki, SiteFiles(pki.server.cert, pki.server.key, pki.ca, htpasswd)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    require_root()
    for tool in ("nginx", "tcpdump", "openssl"):
        require_tool(tool)
    require(DDUMP.exists(), f"needs the ddump console script at {DDUMP}")
    directory = tmp_path_factory.mktemp("secure")
    pki, files = make_files(directory)
    socket_path = directory / "worker.sock"
    # name: (client certificate required, Basic Auth required)
    variants = {
        "tls": (False, False),
        "mtls": (True, False),
        "auth": (False, True),
        "shipped": (True, True),
    }
    sites = {
        name: shipped_site(
            files,
            port=free_port(),
            upstream=f"unix:{socket_path}",
            logs=directory,
            name=f"worker_{name}",
            mtls=mtls,
            basic_auth=auth,
        )
        for name, (mtls, auth) in variants.items()
    }
    excludes = [arg for s in sites.values() for arg in ("--exclude", f"tcp port {s.port}")]
    with WorkerProcess(worker_argv("--listen", f"unix:{socket_path}", *excludes)) as worker:
        worker.wait_listening()
        with Nginx(directory / "nginx", list(sites.values())) as nginx:
            yield Proxy(pki, directory, worker, nginx, **sites)


# ---- TLS: trust roots ----


@pytest.mark.parametrize("host", ["localhost", "[::1]"])
def test_https_through_nginx_with_the_ca_option_streams_packets(proxy: Proxy, host: str) -> None:
    result = ddump("-c", "3", "--ca", str(proxy.pki.ca), proxy.url(proxy.tls, host=host))

    result.assert_captured(3)
    result.assert_no_secret()


def test_a_batch_capture_streams_through_nginx(proxy: Proxy) -> None:
    # The kernel hands a batch capture's packets over in blocks: they come through the proxy
    # as a burst, up to a second late, and nothing is held back in its buffers.
    result = ddump("-c", "3", "--batch", "--ca", str(proxy.pki.ca), proxy.url(proxy.tls))

    result.assert_captured(3)
    starts = [line for line in proxy.worker.log().splitlines() if " start:" in line]
    assert " batch pid=" in starts[-1], starts[-1]


def test_https_trusts_ssl_cert_file_when_no_ca_is_given(proxy: Proxy) -> None:
    result = ddump("-c", "3", proxy.url(proxy.tls), env={"SSL_CERT_FILE": str(proxy.pki.ca)})

    result.assert_captured(3)


def test_wrong_ca_is_a_tls_error_and_stdout_is_an_empty_pcap(proxy: Proxy) -> None:
    before = proxy.captures_started()
    result = ddump("-c", "3", "--ca", str(proxy.pki.wrong_ca), proxy.url(proxy.tls))

    assert result.status == 1
    assert f"localhost:{proxy.tls.port}: TLS certificate not trusted" in result.stderr
    result.assert_empty_pcap()
    assert proxy.captures_started() == before


# ---- mutual TLS ----


def test_mtls_without_a_client_certificate_is_refused_by_nginx(proxy: Proxy) -> None:
    before = proxy.captures_started()
    result = ddump("--ca", str(proxy.pki.ca), proxy.url(proxy.mtls))

    assert result.status == 1
    assert f"localhost:{proxy.mtls.port}: HTTP 400" in result.stderr
    assert "No required SSL certificate was sent" in result.stderr
    result.assert_empty_pcap()
    assert proxy.captures_started() == before


def test_mtls_with_a_certificate_from_another_ca_is_refused_by_nginx(proxy: Proxy) -> None:
    wrong = proxy.pki.wrong_client
    before = proxy.captures_started()
    result = ddump(
        "--ca", str(proxy.pki.ca), "--cert", str(wrong.cert), "--key", str(wrong.key),
        proxy.url(proxy.mtls),
    )  # fmt: skip

    assert result.status == 1
    assert f"localhost:{proxy.mtls.port}: HTTP 400" in result.stderr
    assert "SSL certificate error" in result.stderr
    result.assert_empty_pcap()
    assert proxy.captures_started() == before


@pytest.mark.parametrize("client", ["none", "wrong"])
def test_mtls_refusal_tells_the_user_to_fix_the_client_certificate(
    proxy: Proxy, client: str
) -> None:
    """nginx answers a missing or untrusted client certificate with 400 and an HTML page; the
    message must point at --cert/--key, not blame the worker."""
    pair = proxy.pki.wrong_client
    cert_args = ["--cert", str(pair.cert), "--key", str(pair.key)] if client == "wrong" else []
    result = ddump("--ca", str(proxy.pki.ca), *cert_args, proxy.url(proxy.mtls))

    assert result.status == 1
    assert "the worker refused the request" not in result.stderr
    assert "--cert" in result.stderr


def test_mtls_with_the_right_client_certificate_streams_packets(proxy: Proxy) -> None:
    pair = proxy.pki.client
    result = ddump(
        "-c", "3", "--ca", str(proxy.pki.ca), "--cert", str(pair.cert), "--key", str(pair.key),
        proxy.url(proxy.mtls),
    )  # fmt: skip

    result.assert_captured(3)


# ---- Basic Auth ----


@pytest.mark.parametrize(
    "userinfo",
    [
        pytest.param("", id="no-credentials"),
        # USER@ without $DDUMP_PASSWORD is refused before connecting (tests/test_inputs.py)
        pytest.param(f"{USER}:@", id="empty-password"),
        pytest.param(f"{USER}:{WRONG_PASSWORD}@", id="wrong-password"),
        pytest.param(f"nobody:{quote(PASSWORD, safe='')}@", id="wrong-user"),
    ],
)
def test_basic_auth_failure_is_reported_as_such(proxy: Proxy, userinfo: str) -> None:
    before = proxy.captures_started()
    result = ddump("--ca", str(proxy.pki.ca), proxy.url(proxy.auth, userinfo))

    assert result.status == 1
    assert f"localhost:{proxy.auth.port}: HTTP 401" in result.stderr
    assert "authentication failed" in result.stderr
    result.assert_empty_pcap()
    result.assert_no_secret()
    assert proxy.captures_started() == before


def test_basic_auth_password_from_the_url_streams_packets(proxy: Proxy) -> None:
    userinfo = f"{USER}:{quote(PASSWORD, safe='')}@"
    result = ddump("-c", "3", "--ca", str(proxy.pki.ca), proxy.url(proxy.auth, userinfo))

    result.assert_captured(3)
    result.assert_no_secret()


def inventory(directory: Path, site: Site, pki: Pki, credentials: str, *, mtls: bool) -> Path:
    tls = f"    cert: {pki.client.cert}\n    key: {pki.client.key}\n" if mtls else ""
    path = directory / f"fleet-{site.name}-{credentials.split(':')[0]}-{mtls}.yaml"
    path.write_text(
        "targets:\n"
        f"  - name: behind-nginx\n    host: localhost\n    port: {site.port}\n"
        f"    scheme: https\n    ca: {pki.ca}\n{tls}"
        f"    username: {USER}\n    {credentials}\n"
    )
    return path


def test_basic_auth_password_from_an_inventory_environment_variable(
    proxy: Proxy, tmp_path: Path
) -> None:
    fleet = inventory(tmp_path, proxy.auth, proxy.pki, f"password_env: {PASSWORD_ENV}", mtls=False)
    result = ddump("-c", "3", "-f", str(fleet), env={PASSWORD_ENV: PASSWORD})

    result.assert_captured(3)
    result.assert_no_secret()
    assert "behind-nginx" in result.stderr


def test_basic_auth_password_from_an_inventory_password_file(proxy: Proxy, tmp_path: Path) -> None:
    secret = tmp_path / "ddump.pass"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    fleet = inventory(tmp_path, proxy.auth, proxy.pki, "password_file: ddump.pass", mtls=False)
    result = ddump("-c", "3", "-f", str(fleet))

    result.assert_captured(3)
    result.assert_no_secret()


def test_wrong_password_from_an_inventory_is_an_auth_failure(proxy: Proxy, tmp_path: Path) -> None:
    fleet = inventory(tmp_path, proxy.auth, proxy.pki, f"password_env: {PASSWORD_ENV}", mtls=False)
    result = ddump("-f", str(fleet), env={PASSWORD_ENV: WRONG_PASSWORD})

    assert result.status == 1
    assert "behind-nginx: HTTP 401" in result.stderr and "authentication failed" in result.stderr
    result.assert_no_secret()


def test_shipped_site_needs_both_certificate_and_password(proxy: Proxy, tmp_path: Path) -> None:
    with_both = inventory(
        tmp_path, proxy.shipped, proxy.pki, f"password_env: {PASSWORD_ENV}", mtls=True
    )
    password_only = inventory(
        tmp_path, proxy.shipped, proxy.pki, f"password_env: {PASSWORD_ENV}", mtls=False
    )
    good = ddump("-c", "3", "-f", str(with_both), env={PASSWORD_ENV: PASSWORD})
    no_cert = ddump("-f", str(password_only), env={PASSWORD_ENV: PASSWORD})
    pair = proxy.pki.client
    no_password = ddump(
        "--ca", str(proxy.pki.ca), "--cert", str(pair.cert), "--key", str(pair.key),
        proxy.url(proxy.shipped),
    )  # fmt: skip

    good.assert_captured(3)
    # The shipped site passes GET /capture/stats: the summary has tcpdump's drop count.
    assert "0 dropped by the kernel" in good.stderr, good.stderr
    assert no_cert.status == 1 and "HTTP 400" in no_cert.stderr
    assert no_password.status == 1 and "HTTP 401" in no_password.stderr
    for result in (good, no_cert, no_password):
        result.assert_no_secret()


def test_a_url_refused_before_connecting_does_not_show_its_password(proxy: Proxy) -> None:
    result = ddump(f"https://{USER}:{quote(PASSWORD, safe='')}@localhost:99999/capture")

    assert result.status == 2
    assert "port 99999" in result.stderr
    result.assert_no_secret()


def test_the_worker_never_sees_the_password(proxy: Proxy) -> None:
    userinfo = f"{USER}:{quote(PASSWORD, safe='')}@"
    ddump("-c", "1", "--ca", str(proxy.pki.ca), proxy.url(proxy.auth, userinfo)).assert_captured(1)

    log = proxy.worker.log()
    assert all(secret not in log for secret in secrets_of(PASSWORD))


# ---- what nginx does with the stream ----


def test_health_answers_through_nginx(proxy: Proxy) -> None:
    context = ssl.create_default_context(cafile=str(proxy.pki.ca))
    connection = http.client.HTTPSConnection(
        "localhost", proxy.tls.port, context=context, timeout=10
    )
    try:
        connection.request("GET", "/health")
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()

    assert response.status == 200
    assert b'"status": "ok"' in body and b"tcpdump version" in body


def test_client_leaving_through_nginx_stops_the_remote_tcpdump(proxy: Proxy) -> None:
    """A filter that matches nothing: the stream is silent, and nginx must still tell the
    worker that the client left, or tcpdump would run forever."""
    silent = "udp port 9 and udp port 7"
    result = ddump(
        "--ca", str(proxy.pki.ca), "--duration", "1s",
        proxy.url(proxy.tls) + "?filter=" + quote(silent),
    )  # fmt: skip

    assert result.status == 0, result.stderr
    end = proxy.worker.wait_log(f"filter={silent!r} duration=", timeout=5)
    assert "reason=client closed" in end


# ---- the shipped site's proxying, seen from a scripted upstream ----


@pytest.fixture
def scripted_upstream(tmp_path: Path) -> Iterator[tuple[FakeWorker, Site, Pki]]:
    require_tool("nginx")
    require_tool("openssl")
    pki, files = make_files(tmp_path)
    now = time.time_ns()
    body = pcap_stream([(now, sll2_packet(b"first"))])
    later = pcap_stream([(now + 1, sll2_packet(b"second"))])[GLOBAL_HEADER_LEN:]
    script = Script(body=[body, 1.5, later])
    with FakeWorker({"/capture": script, "/health": Script(body=[b"{}"])}) as upstream:
        site = shipped_site(files, port=free_port(), upstream=f"127.0.0.1:{upstream.port}",
                            logs=tmp_path)  # fmt: skip
        with Nginx(tmp_path / "nginx", [site]):
            yield upstream, site, pki


def https_request(
    site: Site, pki: Pki, method: str, path: str, headers: dict[str, str]
) -> tuple[int, list[tuple[float, bytes]]]:
    """Status, and each piece of the body with the time it arrived (s after the headers)."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(pki.client.cert, pki.client.key)
    connection = http.client.HTTPSConnection("localhost", site.port, context=context, timeout=10)
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    try:
        connection.request(method, path, headers={"Authorization": f"Basic {auth}", **headers})
        response = connection.getresponse()
        start = time.monotonic()
        pieces = []
        while piece := response.read1(65536):
            pieces.append((time.monotonic() - start, piece))
        return response.status, pieces
    finally:
        connection.close()


def test_shipped_site_streams_each_chunk_at_once(
    scripted_upstream: tuple[FakeWorker, Site, Pki],
) -> None:
    _, site, pki = scripted_upstream
    status, pieces = https_request(site, pki, "GET", "/capture?filter=icmp", {})

    assert status == 200
    first_at = next(at for at, piece in pieces if b"first" in piece)
    second_at = next(at for at, piece in pieces if b"second" in piece)
    assert first_at < 0.5, pieces  # not held back until the 1.5 s pause ends
    assert second_at > 1.0


def test_shipped_site_forwards_the_client_address_but_not_its_password(
    scripted_upstream: tuple[FakeWorker, Site, Pki],
) -> None:
    upstream, site, pki = scripted_upstream
    status, _ = https_request(
        site, pki, "GET", "/capture?filter=tcp%20port%2080", {"X-Forwarded-For": "6.6.6.6"}
    )

    assert status == 200
    path, headers = upstream.requests[-1]
    assert path == "/capture"
    assert headers.get("X-Forwarded-For") == "127.0.0.1"
    assert "Authorization" not in headers


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [("GET", "/", 404), ("GET", "/capture/../etc/passwd", 404), ("GET", "/admin", 404),
     ("GET", "/capture/stats/x", 404), ("POST", "/capture", 403), ("DELETE", "/health", 403),
     ("POST", "/capture/stats", 403)],
)  # fmt: skip
def test_shipped_site_forwards_nothing_but_get_capture_stats_and_health(
    scripted_upstream: tuple[FakeWorker, Site, Pki], method: str, path: str, expected: int
) -> None:
    upstream, site, pki = scripted_upstream
    status, _ = https_request(site, pki, method, path, {})

    assert status == expected
    assert upstream.requests == []


def test_shipped_site_keeps_quiet_streams_open_and_unbuffered() -> None:
    directives = {
        line.strip().split("#")[0].strip().rstrip(";")
        for line in SHIPPED_SITE.read_text().splitlines()
    }

    assert "proxy_buffering off" in directives
    assert "proxy_request_buffering off" in directives
    assert "proxy_http_version 1.1" in directives
    assert "proxy_read_timeout 24h" in directives
    assert "proxy_set_header X-Forwarded-For $remote_addr" in directives


# ---- amplification: the stream must not capture itself ----


def packets_on_ports(pcap: Path, ports: list[int]) -> int:
    expression = " or ".join(f"tcp port {port}" for port in ports)
    out = subprocess.run(
        ["tcpdump", "-nn", "-r", str(pcap), expression],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return len(out.splitlines())


def unfiltered_capture(site: Site, pki: Pki, out: Path, *extra: str) -> Result:
    with UdpTraffic():
        proc = subprocess.run(
            [str(DDUMP), "--ca", str(pki.ca), "-w", str(out), *extra,
             f"https://localhost:{site.port}/capture"],
            capture_output=True, timeout=RUN_TIMEOUT_S, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    return Result(proc.returncode, out.read_bytes(), proc.stderr.decode(errors="replace"))


def test_unfiltered_capture_behind_nginx_holds_none_of_its_own_stream(tmp_path: Path) -> None:
    """The documented setup: the worker on 127.0.0.1 excludes nginx's port. Its own port is
    excluded by itself. A control worker without --exclude shows what would happen."""
    require_root()
    require_tool("nginx")
    require_tool("tcpdump")
    pki, files = make_files(tmp_path)
    guarded_port, control_port = free_port(), free_port()
    guarded_argv = worker_argv("--listen", "127.0.0.1:0", "--exclude", f"tcp port {guarded_port}")
    with (
        WorkerProcess(guarded_argv) as guarded,
        WorkerProcess(worker_argv("--listen", "127.0.0.1:0")) as control,
    ):
        guarded_at, control_at = guarded.wait_listening(), control.wait_listening()
        sites = [
            shipped_site(files, port=guarded_port, upstream=guarded_at, logs=tmp_path,
                         name="guarded", mtls=False, basic_auth=False),
            shipped_site(files, port=control_port, upstream=control_at, logs=tmp_path,
                         name="control", mtls=False, basic_auth=False),
        ]  # fmt: skip
        with Nginx(tmp_path / "nginx", sites):
            good = unfiltered_capture(sites[0], pki, tmp_path / "guarded.pcap", "--duration", "2s")
            bad = unfiltered_capture(sites[1], pki, tmp_path / "control.pcap", "-c", "200",
                                     "--duration", "5s")  # fmt: skip

    worker_ports = [int(guarded_at.rsplit(":", 1)[1]), int(control_at.rsplit(":", 1)[1])]
    assert good.status == 0, good.stderr
    assert any(MARK in data for data in good.records())  # it did capture
    assert packets_on_ports(tmp_path / "guarded.pcap", [guarded_port, *worker_ports]) == 0
    assert bad.status == 0, bad.stderr
    assert packets_on_ports(tmp_path / "control.pcap", [control_port]) > 0


# ---- the README's deployment, on two hosts ----


def test_two_hosts_each_behind_its_own_nginx_merge_into_one_capture(tmp_path: Path) -> None:
    """Two hosts as the README deploys them (worker on a unix socket, nginx with mTLS and Basic
    Auth, the proxy's port excluded), one ddump merging both over https."""
    require_root()
    for tool in ("nginx", "tcpdump", "ip"):
        require_tool(tool)
    from tests.netns import Fleet, parse_seq, udp_traffic

    with Fleet(2) as fleet:
        h1, h2 = fleet.hosts
        pki, files = make_files_for(tmp_path, (h1.address, h2.address))
        port = 8443
        with contextlib.ExitStack() as stack:
            for host in fleet.hosts:
                sock = tmp_path / f"{host.name}.sock"
                stack.enter_context(
                    WorkerProcess(
                        worker_argv("--listen", f"unix:{sock}", "--exclude", f"tcp port {port}"),
                        host,
                    )
                ).wait_listening()
                site = shipped_site(
                    files, port=port, upstream=f"unix:{sock}", logs=tmp_path, address=host.address
                )
                stack.enter_context(Nginx(tmp_path / f"nginx-{host.name}", [site], host.argv([])))
            userinfo = f"{USER}:{quote(PASSWORD, safe='')}@"
            urls = [f"https://{userinfo}{h.address}:{port}/capture?filter=udp" for h in (h1, h2)]
            tls = [
                "--ca",
                str(pki.ca),
                "--cert",
                str(pki.client.cert),
                "--key",
                str(pki.client.key),
            ]
            out = tmp_path / "merged.pcap"
            cli = subprocess.Popen(
                [str(DDUMP), "-v", "-w", str(out), *tls, *urls],
                stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            time.sleep(2)  # both captures start
            udp_traffic(h1, h2, port=5020, count=20, rate=200)
            time.sleep(0.6)
            cli.send_signal(2)
            _, stderr = cli.communicate(timeout=RUN_TIMEOUT_S)

    parser = PcapStreamParser()
    records = parser.feed(out.read_bytes())
    seqs = sorted(seq for _, data in records if (seq := parse_seq(data)) is not None)
    assert cli.returncode == 0, stderr
    assert seqs == sorted(list(range(20)) * 2)  # each datagram leaving h1 and arriving at h2
    assert PASSWORD not in stderr and quote(PASSWORD, safe="") not in stderr


def make_files_for(directory: Path, ips: tuple[str, ...]) -> tuple[Pki, SiteFiles]:
    pki = make_pki(directory / "pki", extra_ips=ips)
    htpasswd = directory / "htpasswd"
    htpasswd.write_text(htpasswd_line(USER, PASSWORD))
    return pki, SiteFiles(pki.server.cert, pki.server.key, pki.ca, htpasswd)
