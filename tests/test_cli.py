"""The ddump CLI end to end against scripted HTTP(S) workers: merge, failures, TLS, auth."""

from __future__ import annotations

import contextlib
import os
import re
import ssl
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ddump.pcap import LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2, PcapHeader, PcapStreamParser
from tests.certs import Pki, make_pki
from tests.fake_worker import FakeWorker, Script, fake_workers, pcap_stream, sll2_packet
from tests.test_pcapng import walk

# An hour ahead: records are held until every stream has spoken, whatever the tests' pace.
T0 = (time.time_ns() // 1000 + 3600 * 10**6) * 1000
# A scripted capture that ends by itself must have been asked to: a worker's end that was
# not asked for (it stopped, it restarted) is a failure of the target.
COUNT = "/capture?count=%d"


@dataclass
class Result:
    status: int
    pcap: bytes
    stderr: str

    def records(self) -> list[tuple[int, bytes]]:
        parser = PcapStreamParser()
        records = parser.feed(self.pcap)
        parser.close()
        return records

    def payloads(self) -> list[bytes]:
        return [data[16 + 20 :] for _, data in self.records()]


def ddump(
    *args: str, tmp_path: Path, timeout: float = 30, env: dict[str, str] | None = None
) -> Result:
    out = tmp_path / "out.pcap"
    proc = subprocess.run(
        [sys.executable, "-m", "ddump.cli.main", "-w", str(out), *args],
        capture_output=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )
    pcap = out.read_bytes() if out.exists() else b""
    return Result(proc.returncode, pcap, proc.stderr.decode())


def numbered(host: str, stamps: list[int]) -> list[tuple[int, bytes]]:
    return [(T0 + ts, sll2_packet(f"{host}-{i}@{ts}".encode())) for i, ts in enumerate(stamps)]


def test_two_streams_merge_in_timestamp_order(tmp_path: Path) -> None:
    a = pcap_stream(numbered("a", [10, 30, 50, 70]))
    b = pcap_stream(numbered("b", [20, 40, 60, 80]))
    with fake_workers(
        {"/capture": Script(body=[a[:30], 0.05, a[30:]])}, {"/capture": Script(body=[b])}
    ) as (
        wa,
        wb,
    ):
        # count=4: each capture ends as asked (an end nobody asked for fails a target).
        result = ddump(wa.url(COUNT % 4), wb.url(COUNT % 4), tmp_path=tmp_path)

    assert result.status == 0, result.stderr
    assert [ts - T0 for ts, _ in result.records()] == [10, 20, 30, 40, 50, 60, 70, 80]
    assert result.payloads()[:2] == [b"a-0@10", b"b-0@20"]
    assert "ended (4 packets)" in result.stderr


def test_output_is_read_by_tcpdump(tmp_path: Path) -> None:
    from tests.conftest import require_tool

    tcpdump = require_tool("tcpdump")
    ip = bytes.fromhex("45000024000100004011") + b"\x00\x00" + bytes([198, 18, 0, 1, 198, 18, 0, 2])
    udp = bytes.fromhex("303930390000") + b"\x00\x00" + b"hello!!!"
    udp = udp[:4] + (8 + 8).to_bytes(2, "big") + udp[6:]
    body = pcap_stream([(T0 + 5, sll2_packet(ip + udp))])
    with fake_workers({"/capture": Script(body=[body])}) as (w,):
        result = ddump(w.url(COUNT % 1), tmp_path=tmp_path)
    out = subprocess.run(
        [tcpdump, "-nn", "-r", str(tmp_path / "out.pcap")], capture_output=True, text=True
    )

    assert result.status == 0
    assert "198.18.0.1.12345 > 198.18.0.2.12345: UDP, length 8" in out.stdout, out


def test_micro_big_endian_and_sll_inputs_are_merged_losslessly(tmp_path: Path) -> None:
    sll_frame = b"\x00\x00\x00\x01\x00\x06" + b"\x02" * 8 + b"\x08\x00" + b"sll-0@7000"
    old = pcap_stream(
        [(T0 + 7000, sll_frame)], linktype=LINKTYPE_LINUX_SLL, nano=False, big_endian=True
    )
    new = pcap_stream(numbered("new", [3000, 9000]))
    with fake_workers({"/capture": Script(body=[old])}, {"/capture": Script(body=[new])}) as (
        wo,
        wn,
    ):
        result = ddump(wo.url(COUNT % 1), wn.url(COUNT % 2), tmp_path=tmp_path)

    header = PcapHeader.parse(result.pcap[:24])
    assert result.status == 0, result.stderr
    assert header.nano and header.linktype == 276
    assert [ts - T0 for ts, _ in result.records()] == [3000, 7000, 9000]
    assert result.payloads() == [b"new-0@3000", b"sll-0@7000", b"new-1@9000"]


def test_failed_target_is_named_and_the_others_are_kept(tmp_path: Path) -> None:
    good = pcap_stream(numbered("good", [1, 2, 3]))
    bad_filter = Script(status=400, body=[b"tcpdump: syntax error in filter expression\n"])
    with fake_workers({"/capture": Script(body=[good])}, {"/capture": bad_filter}) as (wg, wb):
        result = ddump(wg.url(), wb.url(), tmp_path=tmp_path)

    assert result.status == 1
    assert len(result.records()) == 3
    assert f"127.0.0.1:{wb.port}" in result.stderr
    assert "HTTP 400" in result.stderr and "syntax error in filter expression" in result.stderr


def test_a_worker_older_than_batch_captures_gets_a_hint(tmp_path: Path) -> None:
    old = Script(
        status=400,
        body=[b"unknown parameter 'batch'; accepted: filter (BPF expression), snaplen (1..262144)"],
    )
    with fake_workers({"/capture": old}) as (w,):
        result = ddump("--batch", w.url(), tmp_path=tmp_path)

    assert result.status == 1
    assert "this worker is older than batch captures: upgrade it, or leave out --batch" in (
        result.stderr
    )


def test_connection_refused_is_reported_and_output_is_a_valid_pcap(tmp_path: Path) -> None:
    with FakeWorker({}) as w:
        port = w.port
    result = ddump(f"http://127.0.0.1:{port}", tmp_path=tmp_path)

    assert result.status == 1
    assert "connection refused" in result.stderr
    assert result.records() == []
    assert len(result.pcap) == 24


def test_body_that_is_not_pcap_names_what_came_back(tmp_path: Path) -> None:
    html = Script(body=[b"<html><head><title>Welcome to nginx!</title></head></html>"])
    with fake_workers({"/capture": html}) as (w,):
        result = ddump(w.url(), tmp_path=tmp_path)

    assert result.status == 1
    assert "not a pcap stream" in result.stderr and "nginx" in result.stderr


def test_stream_cut_mid_record_keeps_whole_records(tmp_path: Path) -> None:
    body = pcap_stream(numbered("cut", [1, 2, 3]))
    with fake_workers({"/capture": Script(body=[body[:-5]], end="abort")}) as (w,):
        result = ddump(w.url(), tmp_path=tmp_path)

    assert result.status == 1
    assert [p for p in result.payloads()] == [b"cut-0@1", b"cut-1@2"]
    assert "mid-stream" in result.stderr or "cut" in result.stderr


def test_idle_target_does_not_hold_back_a_busy_one(tmp_path: Path) -> None:
    now = time.time_ns()
    busy = pcap_stream([(now, sll2_packet(b"first"))])
    with fake_workers(
        {"/capture": Script(body=[busy], end="hang")},
        {"/capture": Script(body=[pcap_stream([])], end="hang")},
    ) as (wb, wi):
        started = time.monotonic()
        result = ddump("-c", "1", "--max-delay", "200ms", wb.url(), wi.url(), tmp_path=tmp_path)
        elapsed = time.monotonic() - started

    assert result.status == 0, result.stderr
    assert result.payloads() == [b"first"]
    assert elapsed < 10
    assert wb.disconnects == 1 and wi.disconnects == 1


def test_count_stops_every_stream(tmp_path: Path) -> None:
    body = pcap_stream(numbered("x", list(range(1, 11))))
    with fake_workers({"/capture": Script(body=[body], end="hang")}) as (w,):
        result = ddump("-c", "4", w.url(), tmp_path=tmp_path)
        deadline = time.monotonic() + 5
        while w.disconnects == 0 and time.monotonic() < deadline:
            time.sleep(0.02)

    assert result.status == 0
    assert len(result.records()) == 4
    assert w.disconnects == 1


def test_bad_url_is_a_usage_error_before_connecting(tmp_path: Path) -> None:
    result = ddump("ftp://host", tmp_path=tmp_path)

    assert result.status == 2
    assert "ftp" in result.stderr


def test_password_is_never_printed(tmp_path: Path) -> None:
    with fake_workers(
        {"/capture": Script(body=[pcap_stream([])])}, basic_auth=("ops", "right")
    ) as (w,):
        url = w.url().replace("http://", "http://ops:s3cr3t-pw@")
        result = ddump("-v", url, tmp_path=tmp_path)

    assert result.status == 1
    assert "401" in result.stderr and "authentication failed" in result.stderr
    assert "s3cr3t-pw" not in result.stderr


def test_basic_auth_with_the_right_password_streams(tmp_path: Path) -> None:
    body = pcap_stream(numbered("auth", [1]))
    with fake_workers({"/capture": Script(body=[body])}, basic_auth=("ops", "p@ss:w/rd")) as (w,):
        url = w.url(COUNT % 1).replace("http://", "http://ops:p%40ss%3Aw%2Frd@")
        result = ddump(url, tmp_path=tmp_path)

    assert result.status == 0, result.stderr
    assert result.payloads() == [b"auth-0@1"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def server_context(pki: Pki, *, require_client: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server.cert, pki.server.key)
    if require_client:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(pki.ca)
    return context


def test_https_with_ca_option_and_with_ssl_cert_file(tmp_path: Path, pki: Pki) -> None:
    body = pcap_stream(numbered("tls", [1]))
    with fake_workers(
        {"/capture": Script(body=[body])}, ssl_context=server_context(pki, require_client=False)
    ) as (w,):
        by_flag = ddump("-ca", str(pki.ca), w.url(COUNT % 1), tmp_path=tmp_path)
        by_env = ddump(w.url(COUNT % 1), tmp_path=tmp_path, env={"SSL_CERT_FILE": str(pki.ca)})

    assert by_flag.status == 0, by_flag.stderr
    assert by_env.status == 0, by_env.stderr
    assert by_flag.payloads() == by_env.payloads() == [b"tls-0@1"]


def test_wrong_ca_is_a_tls_error(tmp_path: Path, pki: Pki) -> None:
    with fake_workers(
        {"/capture": Script(body=[])}, ssl_context=server_context(pki, require_client=False)
    ) as (w,):
        result = ddump("--ca", str(pki.wrong_ca), w.url(), tmp_path=tmp_path)

    assert result.status == 1
    assert "certificate" in result.stderr.lower()
    assert result.records() == []


def test_mutual_tls(tmp_path: Path, pki: Pki) -> None:
    body = pcap_stream(numbered("mtls", [1]))
    context = server_context(pki, require_client=True)
    with fake_workers({"/capture": Script(body=[body])}, ssl_context=context) as (w,):
        without = ddump("--ca", str(pki.ca), w.url(), tmp_path=tmp_path)
        wrong_pair = ["--cert", str(pki.wrong_client.cert), "--key", str(pki.wrong_client.key)]
        wrong = ddump("--ca", str(pki.ca), *wrong_pair, w.url(), tmp_path=tmp_path)
        right = ddump(
            "--ca", str(pki.ca), "-cert", str(pki.client.cert), "-key", str(pki.client.key),
            w.url(COUNT % 1), tmp_path=tmp_path,
        )  # fmt: skip

    assert without.status == 1 and "TLS" in without.stderr
    assert wrong.status == 1 and "TLS" in wrong.stderr
    assert right.status == 0, right.stderr
    assert right.payloads() == [b"mtls-0@1"]


def test_cert_without_key_and_mismatched_pair_fail_before_connecting(
    tmp_path: Path, pki: Pki
) -> None:
    alone = ddump("--cert", str(pki.client.cert), "https://localhost:1", tmp_path=tmp_path)
    mismatched = ddump(
        "--cert",
        str(pki.client.cert),
        "--key",
        str(pki.server.key),
        "https://localhost:1",
        tmp_path=tmp_path,
    )

    assert alone.status == 2 and "--key" in alone.stderr
    assert mismatched.status == 2 and "do not belong together" in mismatched.stderr


def test_closed_stdout_ends_quietly_and_stops_the_streams(tmp_path: Path) -> None:
    body = pcap_stream(numbered("x", list(range(1, 2001))))
    with fake_workers({"/capture": Script(body=[body], end="hang")}) as (w,):
        proc = subprocess.run(
            f"{sys.executable} -m ddump.cli.main {w.url()} | head -c 1000 > /dev/null",
            shell=True,
            capture_output=True,
            timeout=30,
        )
        deadline = time.monotonic() + 5
        while w.disconnects == 0 and time.monotonic() < deadline:
            time.sleep(0.02)

    assert proc.returncode == 0
    assert b"Traceback" not in proc.stderr and b"Broken pipe" not in proc.stderr
    assert w.disconnects == 1


def test_sigint_writes_what_is_buffered_and_exits_zero(tmp_path: Path) -> None:
    now = time.time_ns()
    body = pcap_stream([(now + 60 * 10**9, sll2_packet(b"future"))])  # held back until the end
    out = tmp_path / "out.pcap"
    with fake_workers({"/capture": Script(body=[body], end="hang")}) as (w,):
        proc = subprocess.Popen(
            [sys.executable, "-m", "ddump.cli.main", "-w", str(out), w.url()],
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while not w.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)
        proc.send_signal(2)
        _, err = proc.communicate(timeout=10)

    parser = PcapStreamParser()
    assert proc.returncode == 0, err
    assert [d[36:] for _, d in parser.feed(out.read_bytes())] == [b"future"]


def _interrupted_batch_capture(tmp_path: Path, interrupts: int) -> tuple[int, bytes, list[bytes]]:
    """A batch target whose last block comes 0.8 s after the first SIGINT, sent at 0.3 s."""
    header = PcapHeader(linktype=LINKTYPE_LINUX_SLL2).to_bytes()
    now = time.time_ns()
    # The block also holds a packet captured after the stop: that one is not written.
    later = now + 3 * 10**9
    block = pcap_stream([(now, sll2_packet(b"last block")), (later, sll2_packet(b"later"))])[24:]
    out = tmp_path / "out.pcap"
    with fake_workers({"/capture": Script(body=[header, 1.1, block], end="hang")}) as (w,):
        proc = subprocess.Popen(
            [sys.executable, "-m", "ddump.cli.main", "--batch", "-w", str(out), w.url()],
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while not w.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        for _ in range(interrupts):
            proc.send_signal(2)
            time.sleep(0.6)  # signals closer together are one stop
        _, err = proc.communicate(timeout=10)
    parser = PcapStreamParser()
    return proc.returncode, err, [d[36:] for _, d in parser.feed(out.read_bytes())]


def test_a_stop_waits_for_batch_targets_to_hand_over_their_last_block(tmp_path: Path) -> None:
    status, err, payloads = _interrupted_batch_capture(tmp_path, interrupts=1)
    assert status == 0, err
    assert b"SIGINT: stopping in 1.25 s, once batch targets have handed over" in err
    assert payloads == [b"last block"]


def test_a_second_sigint_stops_a_batch_capture_at_once_and_cleanly(tmp_path: Path) -> None:
    status, err, payloads = _interrupted_batch_capture(tmp_path, interrupts=2)
    assert status == 0, err
    assert payloads == []


def test_one_sigint_ends_the_wait_of_a_duration_stop_cleanly(tmp_path: Path) -> None:
    header = PcapHeader(linktype=LINKTYPE_LINUX_SLL2).to_bytes()
    out = tmp_path / "out.pcap"
    argv = ["--batch", "--duration", "0.5", "--max-delay", "2s", "-w", str(out)]
    with fake_workers({"/capture": Script(body=[header], end="hang")}) as (w,):
        proc = subprocess.Popen(
            [sys.executable, "-m", "ddump.cli.main", *argv, w.url()], stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 10
        while not w.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.9)  # the duration is over: the stop waits 3 s for the batch target
        interrupted = time.monotonic()
        proc.send_signal(2)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert b"duration reached: stopping in 3 s" in err and b"(Ctrl-C to stop now)" in err
    assert time.monotonic() - interrupted < 1.5, err  # not the rest of the wait
    assert out.read_bytes() == header


def test_reconnect_retries_a_failed_target(tmp_path: Path) -> None:
    body = pcap_stream(numbered("again", [1, 2]))
    scripts = [Script(status=503, body=[b"too many captures\n"]), Script(body=[body])]
    with fake_workers({"/capture": scripts}) as (w,):
        result = ddump("--reconnect", "-c", "2", w.url(COUNT % 2), tmp_path=tmp_path)

    assert "HTTP 503" in result.stderr and "retrying in 1 s" in result.stderr
    assert result.payloads() == [b"again-0@1", b"again-1@2"]
    # Its capture began a second late: the capture is partial, and says so.
    assert result.status == 1, result.stderr
    gap = r"not captured from [\d:.]+ to [\d:.]+ \(1\.\d+ s\): HTTP 503"
    assert re.search(gap, result.stderr), result.stderr


def test_ten_targets_connect_concurrently(tmp_path: Path) -> None:
    # Each worker takes 0.5 s to answer, as a real one does while tcpdump starts.
    scripts = [
        {"/capture": Script(body=[0.5, pcap_stream(numbered(f"h{i}", [i]))])} for i in range(10)
    ]
    with fake_workers(*scripts) as workers:
        started = time.monotonic()
        result = ddump(*(w.url(COUNT % 1) for w in workers), tmp_path=tmp_path)
        elapsed = time.monotonic() - started

    assert result.status == 0, result.stderr
    assert len(result.records()) == 10
    assert elapsed < 4, "the targets were contacted one after another"


def test_status_line_on_a_terminal(tmp_path: Path) -> None:
    import pty

    body = pcap_stream(numbered("tty", [1]))
    with fake_workers({"/capture": Script(body=[body, 1.5])}) as (w,):
        leader, follower = pty.openpty()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ddump.cli.main",
                "-w",
                str(tmp_path / "o.pcap"),
                w.url(COUNT % 1),
            ],
            stderr=follower,
            stdin=subprocess.DEVNULL,
        )
        os.close(follower)
        proc.wait(timeout=20)
        seen = b""
        with contextlib.suppress(OSError):
            while chunk := os.read(leader, 4096):
                seen += chunk
        os.close(leader)

    assert proc.returncode == 0
    assert b"\r\x1b[K1/1 targets capturing" in seen
    assert b"1 packets written" in seen


def test_capture_files_merge_by_their_timestamps_alone(tmp_path: Path) -> None:
    old = 1_600_000_000 * 10**9  # years ago: a wall-clock watermark would pass them all
    a, b = tmp_path / "a.pcap", tmp_path / "b.pcap"
    a.write_bytes(pcap_stream([(old + i * 2, sll2_packet(b"a%d" % i)) for i in range(30000)]))
    b.write_bytes(pcap_stream([(old + i * 2 + 1, sll2_packet(b"b%d" % i)) for i in range(30000)]))

    result = ddump(str(a), f"file://{b}", tmp_path=tmp_path)

    stamps = [ts for ts, _ in result.records()]
    assert result.status == 0, result.stderr
    assert stamps == list(range(old, old + 60000))
    assert "late" not in result.stderr


def test_stdin_and_a_file_merge_and_need_neither_tornado_nor_yaml(tmp_path: Path) -> None:
    old = 1_600_000_000 * 10**9
    a = pcap_stream([(old + i * 2, sll2_packet(b"a%d" % i)) for i in range(20000)])
    b = tmp_path / "b.pcap"
    b.write_bytes(pcap_stream([(old + i * 2 + 1, sll2_packet(b"b%d" % i)) for i in range(20000)]))
    out = tmp_path / "out.pcap"
    # Run main() in-process after the merge to see what it imported: files are merged by
    # the same code, without the HTTP client (Tornado) or the inventory reader (YAML).
    code = (
        "import sys; from ddump.cli.main import main; status = main(sys.argv[1:]); "
        "print(sorted(m for m in ('tornado', 'yaml') if m in sys.modules)); sys.exit(status)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "-w", str(out), "-", str(b)],
        input=a,
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"[]\n"
    parser = PcapStreamParser()
    stamps = [ts for ts, _ in parser.feed(out.read_bytes())]
    assert stamps == list(range(old, old + 40000))


def test_second_sigint_exits_at_once_even_with_a_stalled_reader() -> None:
    body = pcap_stream(numbered("x", list(range(1, 100_001))))  # ~7 MB: more than a pipe holds
    with fake_workers({"/capture": Script(body=[body], end="hang")}) as (w,):
        proc = subprocess.Popen(
            [sys.executable, "-m", "ddump.cli.main", w.url()],
            stdout=subprocess.PIPE,  # never read: the output stalls
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        time.sleep(2)
        proc.send_signal(2)  # the first waits (bounded) for the reader to take what is buffered
        time.sleep(0.6)  # a second Ctrl-C sooner would be the same one, told twice
        started = time.monotonic()
        proc.send_signal(2)
        status = proc.wait(timeout=10)
        elapsed = time.monotonic() - started
        assert proc.stdout is not None
        proc.stdout.close()

    assert status == 130
    assert elapsed < 2


def test_duration_stops_the_streams_even_while_the_reader_stalls() -> None:
    body = pcap_stream(numbered("x", list(range(1, 100_001))))  # ~7 MB: more than a pipe holds
    with fake_workers({"/capture": Script(body=[body], end="hang")}) as (w,):
        proc = subprocess.Popen(
            [sys.executable, "-m", "ddump.cli.main", "--duration", "1", w.url()],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while w.disconnects == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert w.disconnects == 1, "the stream stayed open while the output was stalled"
        assert proc.poll() is None  # still handing the buffered packets to the reader
        out, _ = proc.communicate(timeout=20)  # the reader reads again: everything arrives

    parser = PcapStreamParser()
    records = parser.feed(out)
    parser.close()  # whole records only
    assert proc.returncode == 0
    # Everything received before the stop, in order; what was still in flight was not ours.
    assert [data[36:] for _, data in records] == [
        f"x-{i}@{i + 1}".encode() for i in range(len(records))
    ]
    assert len(records) > 1000


def test_malformed_response_header_fails_only_that_target(tmp_path: Path) -> None:
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 200 OK\r\nthis line has no colon\r\n\r\n")
            time.sleep(0.5)

    threading.Thread(target=answer, daemon=True).start()
    good = pcap_stream(numbered("good", [1, 2]))
    with fake_workers({"/capture": Script(body=[good])}) as (w,):
        result = ddump(w.url(), f"http://127.0.0.1:{port}", tmp_path=tmp_path)
    server.close()

    assert result.status == 1
    assert "malformed response header" in result.stderr
    assert result.payloads() == [b"good-0@1", b"good-1@2"]


def test_a_full_disk_is_an_error_not_a_crash(tmp_path: Path) -> None:
    body = pcap_stream(numbered("x", list(range(1, 20_001))))
    source = tmp_path / "in.pcap"
    source.write_bytes(body)
    out = tmp_path / "small.pcap"
    proc = subprocess.run(
        ["sh", "-c", f"ulimit -f 100; exec {sys.executable} -m ddump.cli.main -w {out} {source}"],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert proc.returncode == 1
    assert "cannot write the capture: File too large" in proc.stderr
    assert "Traceback" not in proc.stderr and "unexpected" not in proc.stderr


def test_a_quiet_stdin_does_not_freeze_the_session(tmp_path: Path) -> None:
    header = pcap_stream([])
    with subprocess.Popen(
        [sys.executable, "-m", "ddump.cli.main", "--duration", "1", "-w", str(tmp_path / "o"), "-"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdin is not None
        proc.stdin.write(header)
        proc.stdin.flush()  # then nothing more, and the pipe stays open
        started = time.monotonic()
        status = proc.wait(timeout=10)
        elapsed = time.monotonic() - started
        proc.stdin.close()

    assert status == 0
    assert elapsed < 5


def test_password_for_a_url_user_comes_from_the_environment(tmp_path: Path) -> None:
    body = pcap_stream(numbered("env", [1]))
    with fake_workers({"/capture": Script(body=[body])}, basic_auth=("ops", "from-env")) as (w,):
        url = w.url(COUNT % 1).replace("http://", "http://ops@")
        result = ddump(url, tmp_path=tmp_path, env={"DDUMP_PASSWORD": "from-env"})

    assert result.status == 0, result.stderr
    assert result.payloads() == [b"env-0@1"]
    assert "from-env" not in result.stderr


def test_a_slow_reader_gets_every_record_and_a_whole_pcap(tmp_path: Path) -> None:
    source = tmp_path / "in.pcap"
    source.write_bytes(pcap_stream(numbered("slow", list(range(1, 30_001)))))  # ~2 MB
    proc = subprocess.Popen(
        [sys.executable, "-m", "ddump.cli.main", str(source)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    time.sleep(6)  # longer than any flush deadline would be
    out, err = proc.communicate(timeout=30)

    parser = PcapStreamParser()
    records = parser.feed(out)
    parser.close()
    assert proc.returncode == 0, err
    assert len(records) == 30_000


def test_a_target_that_never_answers_holds_the_output_only_briefly(tmp_path: Path) -> None:
    import socket

    blackhole = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    port = blackhole.getsockname()[1]
    now = time.time_ns()
    body = pcap_stream([(now, sll2_packet(b"first"))])
    with fake_workers({"/capture": Script(body=[body], end="hang")}) as (w,):
        started = time.monotonic()
        result = ddump(
            "-c", "1", "--connect-timeout", "20s", w.url(), f"http://127.0.0.1:{port}",
            tmp_path=tmp_path,
        )  # fmt: skip
        elapsed = time.monotonic() - started
    blackhole.close()

    assert result.payloads() == [b"first"]
    assert elapsed < 8, "the silent target held the output until its timeout"
    assert result.status == 1, result.stderr  # it captured nothing: it failed
    assert f"127.0.0.1:{port}: never answered" in result.stderr


# ---- tcpdump's counts, asked of each worker at the end ----


def test_kernel_drops_the_workers_report_are_summed_up_and_warned_about(tmp_path: Path) -> None:
    body = pcap_stream(numbered("a", [10, 20]))
    stats = b'{"running": false, "captured": 2, "received": 9, "dropped_by_kernel": 7}'
    routes = {
        "/capture": Script(body=[body], headers={"X-Ddump-Capture": "cap-1_A"}),
        "/capture/stats": Script(body=[stats]),
    }
    with fake_workers(routes, basic_auth=("ops", "pw")) as (w,):
        url = w.url(COUNT % 2).replace("http://", "http://ops:pw@")
        result = ddump(url, "--format", "pcapng", tmp_path=tmp_path)
    assert result.status == 0, result.stderr
    assert w.uris[-1] == "/capture/stats?id=cap-1_A"
    assert "-s 200" in result.stderr  # what to do, for drops of a capture that ran well
    assert w.requests[-1][1]["Authorization"] == w.requests[0][1]["Authorization"]
    assert "2 packets, " in result.stderr and "7 dropped by the kernel" in result.stderr
    assert "warning: 7 packets were dropped by the kernel" in result.stderr
    assert f"127.0.0.1:{w.port}: 7" in result.stderr
    # pcapng ends with them too: isb_ifrecv (4) = 9 and isb_ifdrop (5) = 7.
    assert struct.pack("<HHQ", 4, 8, 9) + struct.pack("<HHQ", 5, 8, 7) in result.pcap


def test_a_worker_without_counts_leaves_the_summary_without_drops(tmp_path: Path) -> None:
    body = pcap_stream(numbered("a", [10]))
    with (
        fake_workers({"/capture": Script(body=[body], headers={"X-Ddump-Capture": "x1"})}) as (
            old,
        ),
        fake_workers({"/capture": Script(body=[body])}) as (older,),
    ):
        result = ddump("-v", old.url(COUNT % 1), older.url(COUNT % 1), tmp_path=tmp_path)
    assert result.status == 0, result.stderr
    assert "dropped" not in result.stderr.replace("no drop counts", "")
    assert "no drop counts from the worker: HTTP 404" in result.stderr
    assert old.uris[-1] == "/capture/stats?id=x1" and older.uris == ["/capture?count=1"]


def test_drops_of_some_captures_only_are_a_lower_bound_not_a_total(tmp_path: Path) -> None:
    # --reconnect: two captures of one target; the worker knows the counts of one only.
    first = pcap_stream(numbered("a", [1]))
    second = pcap_stream(numbered("a", [2]))
    captures = [
        Script(body=[first], end="abort", headers={"X-Ddump-Capture": "one"}),
        Script(body=[second], headers={"X-Ddump-Capture": "two"}),
    ]
    stats = b'{"running": false, "captured": 1, "received": 3, "dropped_by_kernel": 7}'
    answers = [Script(status=404, body=[b"no such capture\n"]), Script(body=[stats])]
    with fake_workers({"/capture": captures, "/capture/stats": answers}) as (w,):
        result = ddump("--reconnect", "--format", "pcapng", w.url(COUNT % 1), tmp_path=tmp_path)
    assert sorted(w.uris[-2:]) == ["/capture/stats?id=one", "/capture/stats?id=two"]
    assert "at least 7 dropped by the kernel" in result.stderr
    assert "warning: at least 7 packets were dropped" in result.stderr
    assert struct.pack("<HH", 5, 8) not in result.pcap  # no isb_ifdrop: it would pass for all


def test_a_fifo_whose_writer_comes_later_is_waited_for(tmp_path: Path) -> None:
    old = 1_600_000_000 * 10**9
    fifo = tmp_path / "from-ssh"
    os.mkfifo(fifo)
    other = tmp_path / "b.pcap"
    other.write_bytes(pcap_stream([(old + 2, sll2_packet(b"b"))]))

    def write_later() -> None:
        time.sleep(0.5)  # ddump has opened its other file and waits on the FIFO meanwhile
        fifo.write_bytes(pcap_stream([(old + 1, sll2_packet(b"a")), (old + 3, sll2_packet(b"c"))]))

    writer = threading.Thread(target=write_later)
    writer.start()
    result = ddump(str(fifo), str(other), tmp_path=tmp_path)
    writer.join()
    assert result.status == 0, result.stderr
    assert [ts - old for ts, _ in result.records()] == [1, 2, 3]


def test_a_fifo_that_never_gets_a_writer_does_not_hold_a_stop(tmp_path: Path) -> None:
    fifo = tmp_path / "nobody-writes"
    os.mkfifo(fifo)
    started = time.monotonic()
    result = ddump("--duration", "0.5", str(fifo), tmp_path=tmp_path, timeout=10)
    assert result.status == 0, result.stderr
    assert time.monotonic() - started < 5
    assert len(result.pcap) == 24  # a valid, empty pcap


# ---- records held before the output's link type is known ----

LINKTYPE_RAW = 101


def test_a_refused_target_whose_stream_already_ended_is_reported(tmp_path: Path) -> None:
    # b (RAW) sends and ends before a (SLL2, first) starts: the output becomes SLL2 and b's
    # held records cannot join it. Its task is over, so the refusal must still be told.
    a = pcap_stream(numbered("a", [100]))
    b = pcap_stream([(T0 + i, b"raw-%d" % i) for i in range(3)], linktype=LINKTYPE_RAW)
    with fake_workers({"/capture": Script(body=[0.5, a])}, {"/capture": Script(body=[b])}) as (
        wa,
        wb,
    ):
        result = ddump("--max-delay", "2", wa.url(COUNT % 1), wb.url(COUNT % 3), tmp_path=tmp_path)
    assert result.status == 1
    assert f"127.0.0.1:{wb.port}: its link type RAW (101) cannot be merged" in result.stderr
    assert result.payloads() == [b"a-0@100"]


def test_records_held_across_a_reconnect_keep_their_link_type_and_are_written(
    tmp_path: Path,
) -> None:
    # a's first connection sends 3 records and is cut while b has not started: they wait for
    # the output's link type. a reconnects (its new connection has no header yet) and b starts.
    first = pcap_stream(numbered("a", [1, 2, 3]))
    b = pcap_stream(numbered("b", [4, 5]))
    scripts_a = [Script(body=[first], end="abort"), Script(body=[8.0], end="hang")]
    with fake_workers({"/capture": scripts_a}, {"/capture": Script(body=[2.5, b])}) as (wa, wb):
        result = ddump(
            "--reconnect", "--max-delay", "10", "--duration", "5", wa.url(), wb.url(),
            tmp_path=tmp_path,
        )  # fmt: skip
    assert "internal error" not in result.stderr, result.stderr
    assert [ts - T0 for ts, _ in result.records()] == [1, 2, 3, 4, 5]


def test_records_held_are_written_when_the_capture_stops_first(tmp_path: Path) -> None:
    first = pcap_stream(numbered("a", [1, 2, 3]))
    scripts_a = [Script(body=[first], end="abort"), Script(status=503, body=[b"busy\n"])]
    silent = Script(body=[30.0], end="hang")
    with fake_workers({"/capture": scripts_a}, {"/capture": silent}) as (wa, wb):
        result = ddump(
            "--reconnect", "--max-delay", "10", "--duration", "3", wa.url(), wb.url(),
            tmp_path=tmp_path,
        )  # fmt: skip
    assert [ts - T0 for ts, _ in result.records()] == [1, 2, 3], result.stderr


def test_a_target_back_with_another_link_type_is_refused_in_words(tmp_path: Path) -> None:
    first = pcap_stream(numbered("a", [1]))
    again = pcap_stream([(T0 + 2, b"raw")], linktype=LINKTYPE_RAW)
    scripts = [Script(body=[first], end="abort"), Script(body=[again], end="hang")]
    with fake_workers({"/capture": scripts}) as (w,):
        result = ddump("--reconnect", "--duration", "2.5", w.url(), tmp_path=tmp_path)
    assert "internal error" not in result.stderr, result.stderr
    assert "its link type RAW (101) cannot be merged" in result.stderr
    assert result.payloads() == [b"a-0@1"]


def test_count_with_pcapng_counts_only_the_packets_written(tmp_path: Path) -> None:
    old = 1_600_000_000 * 10**9
    a, b = tmp_path / "a.pcap", tmp_path / "b.pcap"
    a.write_bytes(pcap_stream([(old + t, sll2_packet(b"a%d" % t)) for t in (10, 20, 30)]))
    b.write_bytes(pcap_stream([(old + 15, sll2_packet(b"b"))]))
    result = ddump("--format", "pcapng", "-c", "1", str(a), str(b), tmp_path=tmp_path)
    assert result.status == 0, result.stderr
    blocks = walk(result.pcap)
    packets = [body for kind, body in blocks if kind == 6]
    # isb_usrdeliv (option 8) of every interface: the packets written through it, 1 in all.
    delivered = [
        struct.unpack_from("<Q", body, body.index(struct.pack("<HH", 8, 8)) + 4)[0]
        for kind, body in blocks
        if kind == 5
    ]
    assert len(packets) == 1 and sum(delivered) == 1, delivered


@pytest.mark.parametrize("output_format", ["pcap", "pcapng"])
def test_records_held_for_a_silent_target_are_bounded(tmp_path: Path, output_format: str) -> None:
    # 210,000 records (over MAX_BUFFERED) from a, while b answered but sends no header: b stops
    # holding them back at once rather than after --max-delay (30 s).
    base = time.time_ns() - 120 * 10**9
    body = pcap_stream([(base + i, sll2_packet(b"x")) for i in range(210_000)])
    silent = Script(body=[60.0], end="hang")
    with fake_workers({"/capture": Script(body=[body], end="hang")}, {"/capture": silent}) as (
        wa,
        wb,
    ):
        started = time.monotonic()
        result = ddump(
            "--format", output_format, "--max-delay", "30", "-c", "1", wa.url(), wb.url(),
            tmp_path=tmp_path, timeout=90,
        )  # fmt: skip
        elapsed = time.monotonic() - started
    # -c 1 may come before b's answer (the scripted servers share one busy process): then b
    # captured nothing, which is a failure, and only that.
    never = f"127.0.0.1:{wb.port}  0 packets, 0 bytes  [failed: never answered"
    assert result.status == 0 or never in result.stderr, result.stderr
    assert elapsed < 15, f"{elapsed:.1f} s: the silent target held everything"


def test_a_quiet_stdin_cannot_hold_the_others_without_bound(tmp_path: Path) -> None:
    # stdin has no clock: while it is quiet, the file's records wait for it, but not beyond
    # MAX_BUFFERED (200,000): then the oldest go out, and -c 5 can end the capture.
    old = 1_600_000_000 * 10**9
    big = tmp_path / "big.pcap"
    big.write_bytes(pcap_stream([(old + i, sll2_packet(b"x")) for i in range(210_000)]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "ddump.cli.main", "-c", "5", "--duration", "60",
         "-w", str(tmp_path / "out.pcap"), "-", str(big)],
        stdin=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write(pcap_stream([]))  # a header, then nothing: the pipe stays open
    proc.stdin.flush()
    try:
        status = proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.stdin.close()
    assert proc.stderr is not None
    stderr = proc.stderr.read().decode()
    assert status == 0, stderr
    assert "more than 200000 packets held back for quiet targets without a clock (stdin)" in stderr
    parser = PcapStreamParser()
    assert [ts - old for ts, _ in parser.feed((tmp_path / "out.pcap").read_bytes())] == [
        0, 1, 2, 3, 4,
    ]  # fmt: skip


def test_a_slow_sll2_target_still_gets_sll2_output(tmp_path: Path) -> None:
    # The SLL target starts at once, the SLL2 one 0.6 s later (after --max-delay): the output
    # is chosen while it has not told its link type, and must still be SLL2, which takes SLL
    # records without loss, not SLL, which would drop the SLL2 target's interface indexes.
    sll_frame = b"\x00\x00\x00\x01\x00\x06" + b"\x02" * 8 + b"\x08\x00" + b"sll"
    a = pcap_stream([(T0 + 1, sll_frame)], linktype=LINKTYPE_LINUX_SLL)
    b = pcap_stream(numbered("b", [2]))
    with fake_workers({"/capture": Script(body=[a])}, {"/capture": Script(body=[0.6, b])}) as (
        wa,
        wb,
    ):
        result = ddump(wa.url(COUNT % 1), wb.url(COUNT % 1), tmp_path=tmp_path)
    assert result.status == 0, result.stderr
    assert PcapHeader.parse(result.pcap[:24]).linktype == 276
    assert [ts - T0 for ts, _ in result.records()] == [1, 2]
