"""A real nginx for tests, running the shipped site (configs/nginx/ddump-worker.conf).

    site = shipped_site(SiteFiles(...), port=free_port(), upstream="unix:/tmp/w.sock")
    with Nginx(tmp_path / "nginx", [site]) as nginx:
        ...                      # https://localhost:PORT/capture is nginx, then the worker

The shipped file is used as it is, apart from the lines a test must change (listen port,
file paths, upstream address; mutual TLS or Basic Auth turned off for some cases). Each such
line is rewritten by exact match, and a line that is not found fails the test: the tests
cannot drift away from the file users install. nginx runs in the foreground from a generated
nginx.conf whose pid file, logs and temporary directories are all in the test's directory;
it is always stopped, its whole process group with it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SHIPPED_SITE = Path(__file__).resolve().parents[1] / "configs" / "nginx" / "ddump-worker.conf"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class SiteFiles:
    """The files the shipped site names under /etc/ddump, made by the test."""

    certificate: Path
    key: Path
    client_ca: Path
    htpasswd: Path


@dataclass(frozen=True)
class Site:
    """One rewritten copy of the shipped site: its nginx config text and where it listens."""

    name: str
    port: int
    config: str
    address: str = "127.0.0.1"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 and ::1 now (nginx binds it a moment later)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock6:
            try:
                sock6.bind(("::1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port on both 127.0.0.1 and ::1")


def htpasswd_line(user: str, password: str) -> str:
    """An htpasswd entry made as the shipped site's comment says (SHA-512 crypt)."""
    hashed = subprocess.run(
        ["openssl", "passwd", "-6", "-stdin"],
        input=password,
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout.strip()
    return f"{user}:{hashed}\n"


def _rewrite(text: str, old: str, new: str, count: int = 1) -> str:
    found = text.count(old)
    if found != count:
        raise AssertionError(
            f"{SHIPPED_SITE}: expected {count} x {old!r}, found {found}: update tests/nginx.py"
        )
    return text.replace(old, new)


def shipped_site(
    files: SiteFiles,
    *,
    port: int,
    upstream: str,
    logs: Path,
    name: str = "ddump_worker",
    mtls: bool = True,
    basic_auth: bool = True,
    address: str | None = None,
) -> Site:
    """The shipped site listening on 127.0.0.1:`port` and [::1]:`port`, proxying to `upstream`
    (`127.0.0.1:8475` or `unix:/path`). `name` keeps several copies apart in one nginx."""
    text = SHIPPED_SITE.read_text()
    text = _rewrite(text, "upstream ddump_worker {", f"upstream {name} {{")
    text = _rewrite(text, "proxy_pass http://ddump_worker;", f"proxy_pass http://{name};", 3)
    text = _rewrite(text, "    server 127.0.0.1:8475;", f"    server {upstream};")
    if address is None:
        text = _rewrite(text, "listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;")
        text = _rewrite(text, "listen [::]:443 ssl;", f"listen [::1]:{port} ssl;")
    else:  # a host of a fleet (tests/netns.py): its own address only
        text = _rewrite(text, "listen 443 ssl;", f"listen {address}:{port} ssl;")
        text = _rewrite(text, "listen [::]:443 ssl;", "")
    text = _rewrite(text, "/etc/ddump/tls/server.pem;", f"{files.certificate};")
    text = _rewrite(text, "/etc/ddump/tls/server.key;", f"{files.key};")
    text = _rewrite(text, "/etc/ddump/tls/clients-ca.pem;", f"{files.client_ca};")
    text = _rewrite(text, "user_file /etc/ddump/htpasswd;", f"user_file {files.htpasswd};")
    text = _rewrite(text, "/var/log/nginx/ddump-worker.access.log;", f"{logs}/access-{name}.log;")
    # Request errors (a refused client certificate, a wrong password) go to the main error log.
    text = _rewrite(text, "/var/log/nginx/ddump-worker.error.log;", f"{logs}/error.log info;")
    if not mtls:
        text = _rewrite(text, "ssl_verify_client on;", "ssl_verify_client off;")
    if not basic_auth:
        text = _rewrite(text, 'auth_basic "ddump";', "auth_basic off;")
    return Site(name, port, text, address or "127.0.0.1")


def _main_config(directory: Path, sites: list[Site]) -> str:
    # As root, nginx's workers would switch to `nobody`, who cannot read the test's private
    # directory (certificates, htpasswd): keep them root. Without root the line is ignored.
    user = "user root root;" if os.geteuid() == 0 else ""
    body = "\n".join(site.config for site in sites)
    return f"""\
{user}
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log info;
events {{
    worker_connections 512;
}}
http {{
    default_type application/octet-stream;
    access_log {directory}/access.log;
    client_body_temp_path {directory}/tmp/body;
    proxy_temp_path {directory}/tmp/proxy;
    fastcgi_temp_path {directory}/tmp/fastcgi;
    uwsgi_temp_path {directory}/tmp/uwsgi;
    scgi_temp_path {directory}/tmp/scgi;
{body}
}}
"""


class Nginx:
    """nginx in the foreground (`daemon off`), serving `sites`; a context manager."""

    def __init__(self, directory: Path, sites: list[Site], prefix: Sequence[str] = ()) -> None:
        """`prefix` runs nginx through another command, e.g. `ip netns exec NS`."""
        self.directory = directory
        self.sites = sites
        self.prefix = list(prefix)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def error_log(self) -> str:
        path = self.directory / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        (self.directory / "tmp").mkdir(parents=True, exist_ok=True)
        config = self.directory / "nginx.conf"
        config.write_text(_main_config(self.directory, self.sites))
        with open(self.directory / "stderr.log", "wb") as stderr:
            self.process = subprocess.Popen(
                [*self.prefix, binary, "-p", f"{self.directory}/", "-c", str(config),
                 "-e", str(self.directory / "error.log"), "-g", "daemon off;"],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,  # its own group: the teardown takes the workers too
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        waiting = [(site.address, site.port) for site in self.sites]
        while waiting:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                stderr_text = (self.directory / "stderr.log").read_text(errors="replace")
                raise RuntimeError(f"nginx did not start:\n{stderr_text}\n{self.error_log}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(waiting[0], timeout=0.5),
            ):
                waiting.pop(0)
                continue
            time.sleep(0.02)

    def stop(self) -> None:
        """Fast shutdown (SIGTERM); past STOP_TIMEOUT_S, SIGKILL to the whole process group."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        # Wait without reaping: while the master is a zombie its group id cannot be reused, so
        # the SIGKILL below can only reach nginx's own processes (a worker left behind).
        while time.monotonic() < deadline:
            try:
                if os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                    break
            except ChildProcessError:
                break
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(STOP_TIMEOUT_S)

    def __enter__(self) -> Nginx:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
