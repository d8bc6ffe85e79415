"""The worker's HTTP plumbing and lifecycle, with a fake tcpdump (a shell script): no root needed.

The fake behaves by words in its filter: `fake-idle` listens and writes no packet,
`fake-flood` writes zeros as fast as it can, `fake-crash` dies after the header,
`fake-syntax-error` / `fake-permission` fail as tcpdump does, `fake-silent` never listens,
`fake-busy-start` spins without listening, `fake-slow-start` listens after 1.5 s idle;
otherwise it writes a 4-byte packet every 20 ms, up to `-c N`. It logs its argv and a SIGTERM
into $FAKE_TCPDUMP_LOG/<pid>.argv|.term. `-d` (the worker's check that it can capture) succeeds
unless $FAKE_TCPDUMP_NO_CAPTURE is set, and is not logged.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from ddump.pcap import LINKTYPE_LINUX_SLL2, PcapStreamParser
from ddump.worker.app import make_app
from ddump.worker.filter import self_exclusion
from ddump.worker.params import NS_PER_S
from ddump.worker.registry import CaptureRegistry
from ddump.worker.state import WorkerState
from ddump.worker.taps import Tap
from tests.conftest import require_tool
from tests.netns import UnixHTTPConnection, WorkerProcess, worker_argv
from tests.procs import exit_time, has_exited

FAKE_TCPDUMP = r"""#!/bin/sh
if [ "$1" = "--version" ]; then
    echo "tcpdump version 4.99.0-fake"; echo "libpcap version 1.10.0-fake"; exit 0
fi
for arg in "$@"; do
    [ "$arg" = "-d" ] || continue
    if [ -n "$FAKE_TCPDUMP_NO_CAPTURE" ]; then
        echo "tcpdump: any: You don't have permission to perform this capture on that device" >&2
        echo "(socket: Operation not permitted)" >&2; exit 1
    fi
    echo "(000) ret      #262144"; exit 0
done
log="${FAKE_TCPDUMP_LOG:-/dev/null/x}"
[ -d "$log" ] && printf '%s\n' "$@" > "$log/$$.argv"
count=0; previous=""
for arg in "$@"; do [ "$previous" = "-c" ] && count=$arg; previous=$arg; done
for last in "$@"; do :; done
case "$last" in
  *fake-syntax-error*)
    echo "tcpdump: data link type LINUX_SLL2" >&2
    echo "tcpdump: can't parse filter expression: syntax error" >&2; exit 1;;
  *fake-permission*)
    echo "tcpdump: any: You don't have permission to perform this capture on that device" >&2
    echo "(socket: Operation not permitted)" >&2; exit 1;;
  *fake-silent*) exec sleep 30;;
  *fake-busy-start*) while :; do :; done;;
  *fake-slow-start*) sleep 1.5;;
esac
if [ "${last#*fake-crash}" != "$last" ]; then
    echo "tcpdump: listening on any" >&2
    printf '\115\074\262\241\002\000\004\000\000\000\000\000\000\000\000\000'
    printf '\000\000\004\000\024\001\000\000'
    sleep 0.1; echo "tcpdump: pcap_loop: The interface disappeared" >&2; exit 1
fi
n=0
stats() {
    echo "$n packets captured" >&2; echo "$((n * 2)) packets received by filter" >&2
    echo "0 packets dropped by kernel" >&2
}
trap '[ -d "$log" ] && : > "$log/$$.term"; stats; exit 0' TERM
report() {
    printf 'tcpdump: %d packets captured, %d packets received by filter, ' $n $((n * 2)) >&2
    echo "1 packet dropped by kernel" >&2
}
trap report USR1
# Like tcpdump -U: the file header is out before the "listening" line.
printf '\115\074\262\241\002\000\004\000\000\000\000\000\000\000\000\000'
printf '\000\000\004\000\024\001\000\000'
echo "tcpdump: listening on any, link-type LINUX_SLL2 (Linux cooked v2), snapshot length 262144" >&2
case "$last" in
  *fake-idle*) while :; do sleep 0.05; done;;
  *fake-flood*) while :; do head -c 1048576 /dev/zero; done;;
esac
while [ "$count" = 0 ] || [ "$n" -lt "$count" ]; do
    printf '\001\000\000\000\002\000\000\000\004\000\000\000\004\000\000\000pkt\n'
    n=$((n + 1))
    sleep 0.02
done
stats
"""
PCAP_HEADER_LEN = 24
RECORD_LEN = 16 + 4


@dataclass
class Fake:
    path: str
    log: Path

    def runs(self) -> list[list[str]]:
        """The argv of every run so far (without argv[0]), oldest first."""
        files = sorted(self.log.glob("*.argv"), key=lambda path: path.stat().st_mtime_ns)
        return [path.read_text().splitlines() for path in files]

    def pids(self) -> list[int]:
        return [int(path.stem) for path in self.log.glob("*.argv")]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[Fake]:
    yield from fake_tcpdump(monkeypatch)


def fake_tcpdump(monkeypatch: pytest.MonkeyPatch) -> Iterator[Fake]:
    """The fake tcpdump in a temporary directory, logging into it (see the module's text)."""
    # World-readable: a worker running as root runs tcpdump as an unprivileged user.
    with tempfile.TemporaryDirectory(prefix="ddump-fake-") as directory:
        root = Path(directory)
        root.chmod(0o755)
        log = root / "log"
        log.mkdir()
        log.chmod(0o777)
        script = root / "tcpdump"
        script.write_text(FAKE_TCPDUMP)
        script.chmod(0o755)
        monkeypatch.setenv("FAKE_TCPDUMP_LOG", str(log))
        yield Fake(str(script), log)


class ThreadWorker:
    """The worker's Tornado app on 127.0.0.1:<free port>, its IOLoop in a thread of its own."""

    def __init__(self, tcpdump: str, **state: Any) -> None:
        self.tcpdump = tcpdump
        self.state_options = state
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _serve(self) -> None:
        sockets = bind_sockets(0, "127.0.0.1")
        self.port = sockets[0].getsockname()[1]
        options: dict[str, Any] = {"exclusions": (self_exclusion(self.port, ["127.0.0.1"]),)}
        options.update(self.state_options)
        limit = options.pop("max_captures", 4)
        self.state = WorkerState(
            tcpdump=self.tcpdump, captures=CaptureRegistry(limit), drop_to=None, **options
        )
        server = HTTPServer(make_app(self.state))
        server.add_sockets(sockets)
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        server.stop()
        self.state.captures.abort_all("test over")
        await self.state.captures.wait_idle(5 * NS_PER_S)
        await asyncio.wait_for(server.close_all_connections(), 5)

    def __enter__(self) -> ThreadWorker:
        self._thread.start()
        assert self._ready.wait(10), "worker thread did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)
        assert not self._thread.is_alive(), "worker thread did not stop"

    def get(self, path: str, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        connection.request("GET", path, headers=headers or {})
        return connection.getresponse()


def wait_gone(pid: int, timeout: float) -> float:
    """Seconds until `pid` is gone (or a zombie); fails after `timeout`."""
    seconds = exit_time(pid, timeout)
    if seconds is None:
        raise AssertionError(f"process {pid} still runs after {timeout} s")
    return seconds


def wait_for(condition: Any, timeout: float = 5) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.01)


# ---- the stream ----


def test_headers_come_as_soon_as_tcpdump_listens_before_any_packet(fake: Fake) -> None:
    with ThreadWorker(fake.path) as worker:
        before = time.time_ns()
        response = worker.get("/capture?filter=fake-idle")
        after = time.time_ns()
        assert response.status == 200
        assert response.getheader("Content-Type") == "application/vnd.tcpdump.pcap"
        assert response.getheader("Cache-Control") == "no-store"
        assert response.getheader("X-Accel-Buffering") == "no"
        assert response.getheader("Transfer-Encoding") == "chunked"
        assert before <= int(response.getheader("X-Ddump-Clock", "0")) <= after
        assert response.read(PCAP_HEADER_LEN) == fake_global_header()
        response.close()


def fake_global_header() -> bytes:
    return bytes.fromhex("4d3cb2a1 02000400 00000000 00000000 00000400 14010000")


def test_count_ends_the_stream_cleanly_with_every_record(fake: Fake) -> None:
    with ThreadWorker(fake.path) as worker:
        body = worker.get("/capture?count=5").read()  # IncompleteRead unless chunked end
    parser = PcapStreamParser()
    records = parser.feed(body)
    parser.close()
    assert parser.header is not None and parser.header.linktype == LINKTYPE_LINUX_SLL2
    assert [record[16:] for _, record in records] == [b"pkt\n"] * 5


def test_tcpdump_runs_with_the_composed_filter_after_double_dash(fake: Fake) -> None:
    excludes = ("tcp port 8475", "tcp port 443")
    with ThreadWorker(fake.path, exclusions=excludes) as worker:
        worker.get("/capture?count=1&snaplen=96&filter=udp+or+(tcp)").read()
    assert fake.runs() == [
        [
            *("-i", "any", "-U", "-w", "-", "--time-stamp-precision=nano", "--immediate-mode"),
            *("-s", "96", "-c", "1", "--"),
            "not (tcp port 8475) and not (tcp port 443) and (udp or (tcp))",
        ]
    ]


def test_a_batch_capture_runs_tcpdump_without_immediate_mode(fake: Fake) -> None:
    with ThreadWorker(fake.path) as worker:
        worker.get("/capture?count=1&batch=1").read()
        worker.get("/capture?count=1&batch=0").read()
    batch, immediate = fake.runs()
    assert "--immediate-mode" not in batch
    assert immediate == [*batch[:6], "--immediate-mode", *batch[6:]]


def test_duration_ends_the_response_cleanly_even_with_no_packet(fake: Fake) -> None:
    with ThreadWorker(fake.path) as worker:
        start = time.monotonic()
        body = worker.get("/capture?filter=fake-idle&duration=0.3").read()
        elapsed = time.monotonic() - start
    assert body == fake_global_header()
    assert 0.3 <= elapsed < 2
    assert len(list(fake.log.glob("*.term"))) == 1  # asked to stop, not killed


def test_tcpdump_dying_mid_stream_cuts_the_response_instead_of_ending_it(
    fake: Fake, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ddump.worker")
    with ThreadWorker(fake.path) as worker:
        response = worker.get("/capture?filter=fake-crash")
        assert response.status == 200
        with pytest.raises(http.client.IncompleteRead):
            response.read()
        wait_for(lambda: any(" end:" in r.getMessage() for r in caplog.records))
    [end] = [r.getMessage() for r in caplog.records if " end:" in r.getMessage()]
    assert "tcpdump failed: pcap_loop: The interface disappeared" in end


# ---- refusals ----


def test_bad_filter_is_400_with_tcpdumps_message(fake: Fake) -> None:
    with ThreadWorker(fake.path) as worker:
        response = worker.get("/capture?filter=fake-syntax-error")
        assert response.status == 400
        assert response.getheader("Content-Type", "").startswith("text/plain")
        assert "can't parse filter expression: syntax error" in response.read().decode()


def test_unbalanced_filter_is_400_and_tcpdump_never_runs(fake: Fake) -> None:
    with ThreadWorker(fake.path) as worker:
        response = worker.get("/capture?filter=tcp)+or+(tcp+port+1")
        assert response.status == 400
        assert "unbalanced parentheses" in response.read().decode()
    assert fake.runs() == []


def test_unknown_parameter_is_400_listing_the_accepted_ones(fake: Fake) -> None:
    with ThreadWorker(fake.path) as worker:
        response = worker.get("/capture?interface=eth0")
        text = response.read().decode()
    assert response.status == 400
    assert "'interface'" in text and "snaplen" in text and "duration" in text


def test_missing_capability_is_503_naming_the_fix(fake: Fake) -> None:
    with ThreadWorker(fake.path) as worker:
        response = worker.get("/capture?filter=fake-permission")
        text = response.read().decode()
    assert response.status == 503
    assert "CAP_NET_RAW" in text and "AmbientCapabilities" in text


def test_missing_tcpdump_is_503_naming_the_fix() -> None:
    with ThreadWorker("/nonexistent/tcpdump") as worker:
        capture = worker.get("/capture")
        health = worker.get("/health")
        assert capture.status == 503
        assert "apt-get install tcpdump" in capture.read().decode()
        assert "--tcpdump" in health.read().decode()
        assert health.status == 503


def test_tcpdump_that_never_listens_gets_503_after_a_bounded_wait(fake: Fake) -> None:
    # Idle, it is given START_WALL_FACTOR times the limit: it might be waiting for a CPU.
    with ThreadWorker(fake.path, start_timeout_ns=NS_PER_S // 2) as worker:
        start = time.monotonic()
        response = worker.get("/capture?filter=fake-silent")
        assert response.status == 503
        text = response.read().decode()
        assert "did not start listening within 3 s, with 0.0 s of CPU" in text
        assert time.monotonic() - start < 3 + 2
        wait_gone(fake.pids()[0], 1)


def test_tcpdump_spinning_without_listening_is_refused_once_it_used_the_cpu_limit(
    fake: Fake,
) -> None:
    with ThreadWorker(fake.path, start_timeout_ns=NS_PER_S // 2) as worker:
        start = time.monotonic()
        response = worker.get("/capture?filter=fake-busy-start")
        assert response.status == 503
        assert "did not start listening within 0.5 s of CPU time" in response.read().decode()
        assert time.monotonic() - start < 3
        wait_gone(fake.pids()[0], 1)


def test_a_tcpdump_slow_to_start_without_using_cpu_is_waited_for(fake: Fake) -> None:
    """A tcpdump waiting for a CPU on a busy host is not refused at the limit in wall time."""
    with ThreadWorker(fake.path, start_timeout_ns=NS_PER_S // 2) as worker:
        response = worker.get("/capture?filter=fake-slow-start&count=1")
        assert response.status == 200
        body = response.read()
    assert len(body) > PCAP_HEADER_LEN


def test_over_max_captures_is_503_with_retry_after(fake: Fake) -> None:
    with ThreadWorker(fake.path, max_captures=1) as worker:
        first = worker.get("/capture?filter=fake-idle")
        assert first.status == 200
        second = worker.get("/capture?filter=fake-idle")
        assert second.status == 503
        assert int(second.getheader("Retry-After", "0")) > 0
        assert "--max-captures" in second.read().decode()
        first.close()


# ---- lifecycle ----


def test_client_disconnect_stops_tcpdump_within_a_second_without_packets(fake: Fake) -> None:
    with ThreadWorker(fake.path) as worker:
        response = worker.get("/capture?filter=fake-idle")
        assert response.status == 200
        [pid] = fake.pids()
        response.close()
        assert wait_gone(pid, 1) < 1
        wait_for(lambda: len(worker.state.captures) == 0)


def test_each_capture_logs_one_start_and_one_end_line(
    fake: Fake, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ddump.worker")
    with ThreadWorker(fake.path) as worker:
        worker.get("/capture?count=3&filter=udp", headers={"X-Forwarded-For": "203.0.113.9"}).read()
        wait_for(lambda: any(" end:" in r.getMessage() for r in caplog.records))
    lines = [r.getMessage() for r in caplog.records if r.name == "ddump.worker"]
    [start] = [line for line in lines if " start:" in line]
    [end] = [line for line in lines if " end:" in line]
    for line in (start, end):
        assert "client=127.0.0.1 (X-Forwarded-For: 203.0.113.9)" in line
        assert "filter='udp'" in line
    assert f"bytes={PCAP_HEADER_LEN + 3 * RECORD_LEN} packets=3" in end
    assert "captured=3 received=6 dropped=0" in end
    assert "duration=" in end


def test_health_reports_the_tcpdump_version(fake: Fake) -> None:
    with ThreadWorker(fake.path) as worker:
        response = worker.get("/health")
        body = response.read()
    assert response.status == 200
    health = json.loads(body)
    assert health["status"] == "ok"
    assert health["tcpdump"] == "tcpdump version 4.99.0-fake"
    assert health["libpcap"] == "libpcap version 1.10.0-fake"


def test_health_that_tcpdump_does_not_answer_is_503_and_leaves_nothing_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ddump.worker.health

    monkeypatch.setattr(ddump.worker.health, "VERSION_TIMEOUT_S", 0.5)
    stuck = tmp_path / "tcpdump"
    stuck.write_text(f"#!/bin/sh\necho $$ >> {tmp_path}/pids\nexec sleep 30\n")
    stuck.chmod(0o755)
    with ThreadWorker(str(stuck)) as worker:
        response = worker.get("/health")
        body = response.read()

    assert response.status == 503
    assert "did not answer within 0.5 s" in json.loads(body)["error"]
    pids = (tmp_path / "pids").read_text().split()
    assert pids and not any(Path(f"/proc/{pid}").exists() for pid in pids)


# ---- the process: signals, unix socket, command line ----


def fake_worker(fake: Fake, *args: str) -> WorkerProcess:
    return WorkerProcess(worker_argv("--tcpdump", fake.path, *args))


def test_sigterm_ends_every_response_cleanly_and_exits_0(fake: Fake) -> None:
    with fake_worker(fake, "--listen", "127.0.0.1:0") as worker:
        address = worker.wait_listening()
        host, port = address.rsplit(":", 1)
        responses = []
        for _ in range(2):
            connection = http.client.HTTPConnection(host, int(port), timeout=10)
            connection.request("GET", "/capture?filter=fake-idle")
            responses.append(connection.getresponse())
        assert [r.status for r in responses] == [200, 200]
        pids = fake.pids()
        assert worker.stop(signal.SIGTERM) == 0
        for response in responses:
            assert response.read() == fake_global_header()  # the chunked end arrived
        for pid in pids:
            wait_gone(pid, 1)
    assert "SIGTERM: stopping 2 capture(s)" in worker.log()
    if os.geteuid() == 0:
        assert "running as root" in worker.log()


def test_sigterm_with_a_client_that_stopped_reading_still_exits_0_in_bounded_time(
    fake: Fake,
) -> None:
    with fake_worker(fake, "--listen", "127.0.0.1:0") as worker:
        host, port = worker.wait_listening().rsplit(":", 1)
        stalled = socket.create_connection((host, int(port)))
        stalled.sendall(b"GET /capture?filter=fake-flood HTTP/1.1\r\nHost: w\r\n\r\n")
        assert stalled.recv(4096).startswith(b"HTTP/1.1 200")  # and never reads again
        time.sleep(0.5)  # every buffer between the fake and this socket fills up
        start = time.monotonic()
        assert worker.stop(signal.SIGTERM, timeout=15) == 0
        assert time.monotonic() - start < 9  # 5 s for responses to end, then cut
        stalled.close()
    assert "reason=worker stopping" in worker.log()


def test_unix_socket_replaces_a_stale_file_and_is_removed_at_exit(fake: Fake) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "worker.sock")
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)
        stale.close()  # the file stays, nobody listens: what a crashed worker leaves
        with fake_worker(fake, "--listen", f"unix:{path}", "--socket-mode", "0600") as worker:
            assert worker.wait_listening() == f"unix:{path}"
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            connection = UnixHTTPConnection(path)
            connection.request("GET", "/capture?count=2")
            response = connection.getresponse()
            assert response.status == 200
            assert len(response.read()) == PCAP_HEADER_LEN + 2 * RECORD_LEN
            assert "client=unix" in worker.wait_log(" end:")
            assert worker.stop() == 0
        assert not os.path.exists(path)


def test_a_unix_socket_in_use_is_not_stolen(fake: Fake) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "worker.sock")
        with socket.socket(socket.AF_UNIX) as live:
            live.bind(path)
            live.listen()
            with fake_worker(fake, "--listen", f"unix:{path}") as worker:
                assert worker.process.wait(10) == 2
            assert "in use" in worker.log()
            assert os.path.exists(path)


def test_an_unbalanced_exclude_is_a_usage_error(fake: Fake) -> None:
    with fake_worker(fake, "--listen", "127.0.0.1:0", "--exclude", "tcp port 1)") as worker:
        assert worker.process.wait(10) == 2
    assert "--exclude" in worker.log() and "unbalanced" in worker.log()


def test_an_exclude_tcpdump_cannot_compile_stops_the_worker_at_start() -> None:
    tcpdump = require_tool("tcpdump")
    with WorkerProcess(
        worker_argv("--tcpdump", tcpdump, "--listen", "127.0.0.1:0", "--exclude", "tcp prot 443")
    ) as worker:
        assert worker.process.wait(10) == 2
    assert "--exclude 'tcp prot 443': tcpdump cannot compile it: " in worker.log()
    assert "syntax error" in worker.log() and "reading from file" not in worker.log()


def test_entry_point_help_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ddump.worker.main", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0
    assert "CAP_NET_RAW" in out.stdout


# ---- GET /capture/stats ----


def stats_of(worker: ThreadWorker, token: str) -> tuple[int, dict[str, Any]]:
    response = worker.get(f"/capture/stats?id={token}")
    body = response.read()
    return response.status, json.loads(body) if response.status == 200 else {"text": body}


def test_stats_of_a_running_capture_come_from_tcpdump_when_asked(fake: Fake) -> None:
    with ThreadWorker(fake.path) as worker:
        response = worker.get("/capture?filter=udp")
        token = response.getheader("X-Ddump-Capture")
        assert response.status == 200 and token
        response.read(PCAP_HEADER_LEN + 3 * RECORD_LEN)  # three packets went out
        status, stats = stats_of(worker, token)
        assert status == 200 and stats["running"] is True
        # The fake prints its count on SIGUSR1 (as tcpdump does), with one drop.
        assert stats["captured"] >= 3 and stats["received"] == 2 * stats["captured"]
        assert stats["dropped_by_kernel"] == 1
        response.close()


def test_stats_of_an_ended_capture_are_its_exit_counts(fake: Fake) -> None:
    with ThreadWorker(fake.path) as worker:
        response = worker.get("/capture?count=3")
        token = response.getheader("X-Ddump-Capture")
        response.read()
        wait_for(lambda: len(worker.state.captures) == 0)
        status, stats = stats_of(worker, token)
        assert (status, stats) == (
            200,
            {
                "running": False,
                "captured": 3,
                "received": 6,
                "dropped_by_kernel": 0,
                "dropped_by_interface": None,
            },
        )


def test_stats_of_an_unknown_capture_are_a_404_and_other_parameters_a_400(fake: Fake) -> None:
    with ThreadWorker(fake.path) as worker:
        status, body = stats_of(worker, "no-such-capture")
        assert status == 404 and b"X-Ddump-Capture" in body["text"]
        assert stats_of(worker, "")[0] == 404
        response = worker.get("/capture/stats?id=x&filter=udp")
        assert response.status == 400 and b"filter" in response.read()


def wrapper_script(directory: Path, body: str) -> str:
    """A --tcpdump that is a shell script running `body` (readable by the worker's user)."""
    directory.chmod(0o755)
    wrapper = directory / "tcpdump-wrapper"
    wrapper.write_text(f"#!/bin/sh\n{body}\n")
    wrapper.chmod(0o755)
    return str(wrapper)


def test_stats_never_signal_a_wrapper_that_would_die_of_it(fake: Fake, tmp_path: Path) -> None:
    # A --tcpdump wrapper that runs tcpdump without exec: SIGUSR1 would kill the shell and
    # leave tcpdump behind, out of reach. The worker signals only a process that handles it.
    with ThreadWorker(wrapper_script(tmp_path, f'{fake.path} "$@"')) as worker:
        response = worker.get("/capture?filter=fake-idle")
        token = response.getheader("X-Ddump-Capture")
        [pid] = fake.pids()
        status, stats = stats_of(worker, token)
        assert status == 200 and stats["running"] is True and stats["captured"] is None
        assert not has_exited(pid)
        response.close()
        wait_gone(pid, 2)


def test_statistics_are_not_kept_with_the_messages(fake: Fake) -> None:
    with ThreadWorker(fake.path) as worker:
        response = worker.get("/capture?filter=udp")
        token = response.getheader("X-Ddump-Capture")
        for _ in range(3):
            assert stats_of(worker, token)[1]["dropped_by_kernel"] == 1
        capture = worker.state.captures.find(token)
        assert isinstance(capture, Tap)
        assert "listening on" in capture.stderr_text
        assert "packets captured" not in capture.stderr_text
        response.close()


def test_what_a_wrapper_leaves_behind_is_ended_with_it(fake: Fake, tmp_path: Path) -> None:
    # A --tcpdump wrapper that starts tcpdump in the background and exits: the worker ends its
    # whole process group when the process it started ends, so nothing is left running.
    with ThreadWorker(wrapper_script(tmp_path, f'{fake.path} "$@" &\nsleep 0.5')) as worker:
        response = worker.get("/capture?filter=fake-idle")
        assert response.status == 200
        [pid] = fake.pids()
        wait_gone(pid, 3)  # the wrapper exits after 0.5 s; the fake with it
        response.read()  # and the response ends


# ---- clients that misbehave ----


def raw_request(worker: ThreadWorker, request: bytes) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", worker.port), timeout=10)
    client.sendall(request)
    return client


def test_a_client_that_sent_more_than_its_request_is_still_seen_leaving(fake: Fake) -> None:
    # Extra bytes (a pipelined request, a stray CRLF) sit unread in Tornado's buffer, which
    # then no longer watches for the client's FIN: the worker asks the socket itself.
    with ThreadWorker(fake.path) as worker:
        client = raw_request(
            worker, b"GET /capture?filter=fake-idle HTTP/1.1\r\nHost: x\r\n\r\n\r\n"
        )
        assert client.recv(4096).startswith(b"HTTP/1.1 200")
        [pid] = fake.pids()
        client.close()
        assert wait_gone(pid, 3) < 3
        wait_for(lambda: len(worker.state.captures) == 0)


def test_http_1_0_gets_505_since_only_chunks_tell_a_clean_end(fake: Fake) -> None:
    with ThreadWorker(fake.path) as worker:
        client = raw_request(worker, b"GET /capture HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        answer = client.recv(4096)
        client.close()
    assert answer.startswith(b"HTTP/1.1 505") and b"HTTP/1.1" in answer.split(b"\r\n\r\n")[1]
    assert fake.runs() == []


def test_a_request_body_is_refused_not_buffered(fake: Fake) -> None:
    with ThreadWorker(fake.path) as worker:
        client = raw_request(worker, b"GET /health HTTP/1.1\r\nContent-Length: 50000000\r\n\r\n")
        client.settimeout(5)
        try:
            answer = client.recv(4096)
        except ConnectionResetError:
            answer = b""
        client.close()
    assert answer == b"" or answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 413"))


def test_a_capture_stopped_while_starting_is_a_503_not_a_bad_filter(fake: Fake) -> None:
    with ThreadWorker(fake.path) as worker:
        result: dict[str, Any] = {}

        def ask() -> None:
            response = worker.get("/capture?filter=fake-silent")  # never says it listens
            result["status"], result["body"] = response.status, response.read()

        asker = threading.Thread(target=ask)
        asker.start()
        wait_for(lambda: len(worker.state.captures) == 1)
        assert worker._loop is not None
        worker._loop.call_soon_threadsafe(worker.state.captures.stop_all, "worker stopping")
        asker.join(10)
    assert result["status"] == 503, result
    assert b"stopped while starting: worker stopping" in result["body"]
