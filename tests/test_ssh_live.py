"""`ssh://` targets against real OpenSSH servers in network namespace hosts (see tests/sshd.py)."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from ddump.pcap import LINKTYPE_LINUX_SLL2, PcapStreamParser
from tests.conftest import require, require_root, require_tool
from tests.netns import Fleet, Host, WorkerProcess, parse_seq, udp_traffic, worker_argv
from tests.sshd import PLAIN_USER, SSHD, SshSite

SLL2_LEN = 20
PACKET_OUTGOING = 4
WORKER_PORT = 8475


def ssh_url(host: Host, bpf: str | None = "udp", *, user: str = "", sudo: bool = True) -> str:
    query = [f"filter={quote(bpf, safe='')}"] if bpf is not None else []
    query += ["sudo=1"] if sudo else []
    who = f"{user}@" if user else ""
    return f"ssh://{who}{host.address}" + ("?" + "&".join(query) if query else "")


@pytest.fixture
def site() -> Iterator[SshSite]:
    require_root()
    for tool in ("ip", "tcpdump", "ssh", "ssh-keygen", "sudo"):
        require_tool(tool)
    require(Path(SSHD).exists(), f"needs {SSHD} (openssh-server)")
    with SshSite() as site:
        yield site


class Cli:
    """The real `ddump` in the root namespace, its ssh reading the site's configuration."""

    def __init__(
        self, site: SshSite, args: list[str], out: Path, env: dict[str, str] | None = None
    ) -> None:
        self.out = out
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ddump.cli.main", "-w", str(out), *args],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**site.env, **(env or {})},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, n: int = 1, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while sum(text in line for line in self.lines) < n:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(f"no {n} x {text!r} in time:\n{self.stderr}")
            time.sleep(0.02)

    def finish(self, signum: int | None = signal.SIGINT, timeout: float = 20) -> int:
        if signum is not None and self.process.poll() is None:
            self.process.send_signal(signum)
        self.process.wait(timeout)
        self._reader.join(5)
        return self.process.returncode

    def records(self) -> list[tuple[int, bytes]]:
        parser = PcapStreamParser()
        records = parser.feed(self.out.read_bytes())
        parser.close()
        assert parser.header is not None and parser.header.linktype == LINKTYPE_LINUX_SLL2
        return records


def _ip_payload(data: bytes) -> bytes:
    return data[16 + SLL2_LEN :]


def udp_flows(records: list[tuple[int, bytes]]) -> dict[tuple[int, int], list[int]]:
    """(udp dst port, seq) -> [sll2 packet type] in output order."""
    seen: dict[tuple[int, int], list[int]] = collections.defaultdict(list)
    for _, data in records:
        seq = parse_seq(data)
        ip = _ip_payload(data)
        if seq is None or ip[9] != 17:
            continue
        (dport,) = struct.unpack(">H", ip[(ip[0] & 0x0F) * 4 + 2 :][:2])
        seen[(dport, seq)].append(data[16 + 10])
    return seen


def tcp_port_22(records: list[tuple[int, bytes]]) -> int:
    count = 0
    for _, data in records:
        ip = _ip_payload(data)
        if ip[9] == 6:
            sport, dport = struct.unpack(">HH", ip[(ip[0] & 0x0F) * 4 :][:4])
            count += 22 in (sport, dport)
    return count


def tcpdumps(host: Host, wait: float = 3) -> list[int]:
    """The host's tcpdump processes, once none is left or `wait` seconds passed."""
    deadline = time.monotonic() + wait
    while True:
        found = [pid for pid in host.pids() if _command(pid) == "tcpdump"]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def _command(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return None


def test_ssh_hosts_and_a_worker_merge_every_packet_once_in_order_without_ssh_traffic(
    site: SshSite, tmp_path: Path
) -> None:
    with Fleet(4) as fleet:
        h1, h2, h3, h4 = fleet.hosts
        for host in (h1, h2, h3):
            site.serve(host)
        with WorkerProcess(worker_argv("--listen", f":{WORKER_PORT}"), h4) as worker:
            worker.wait_listening()
            worker_url = f"http://{h4.address}:{WORKER_PORT}/capture?filter=udp"
            # h1 captures with no filter at all: its own SSH session must still stay out.
            targets = [ssh_url(h1, None), ssh_url(h2), ssh_url(h3), worker_url]
            cli = Cli(site, ["--max-delay", "3s", *targets], tmp_path / "out.pcap")
            cli.wait_for(": capturing", 4)

            sent = {
                5001: udp_traffic(h1, h2, port=5001, count=200, rate=2000, src_port=4001),
                5002: udp_traffic(h2, h3, port=5002, count=200, rate=2000, src_port=4002),
                5003: udp_traffic(h3, h4, port=5003, count=200, rate=2000, src_port=4003),
                5004: udp_traffic(h4, h1, port=5004, count=200, rate=2000, src_port=4004),
            }
            time.sleep(0.6)
            status = cli.finish()
    records = cli.records()

    assert status == 0, cli.stderr
    stamps = [ts for ts, _ in records]
    assert stamps == sorted(stamps)
    seen = udp_flows(records)
    for port, traffic in sent.items():
        assert traffic.received == 200
        for seq in range(200):
            # Leaving the sender, then arriving at the receiver: each once, in that order.
            assert seen[(port, seq)] == [PACKET_OUTGOING, 0], (port, seq)
    assert tcp_port_22(records) == 0
    # Nothing else over IPv4 (h1 captures everything, IPv6 noise of its own included).
    ipv4 = [data for _, data in records if data[16:18] == b"\x08\x00"]
    assert len(ipv4) == 1600, [data.hex() for data in ipv4 if parse_seq(data) is None]
    # tcpdump's exit counts reached the summary: from the SSH targets' stderr, the worker's.
    assert cli.stderr.count(", 0 dropped by the kernel  [stopped]") == 4, cli.stderr
    for host in (h1, h2, h3):
        assert tcpdumps(host) == []


HOSTILE = (
    "udp' ; touch {m} ; '",
    'udp" ; touch {m} ; "',
    "udp $(touch {m})",
    "udp `touch {m}`",
    "udp; touch {m}",
    "udp\ntouch {m}",
    "udp | touch {m}",
    "udp '\\'' ; touch {m} #",
    "udp\n~.\ntouch {m}",
)


def test_hostile_filters_reach_tcpdump_as_text_and_run_nothing(
    site: SshSite, tmp_path: Path
) -> None:
    markers = site.dir / "markers"
    markers.mkdir()
    markers.chmod(0o1777)  # the login user could create them, if anything ran
    with Fleet(2) as fleet:
        h1, h2 = fleet.hosts
        site.serve(h1)
        hostile = [bpf.format(m=markers / f"m{i}") for i, bpf in enumerate(HOSTILE)]
        # `&&` is BPF's `and`: a filter with shell syntax in it that tcpdump accepts.
        targets = [ssh_url(h1, bpf) for bpf in hostile] + [ssh_url(h1, "udp && udp")]
        cli = Cli(site, targets, tmp_path / "out.pcap")
        cli.wait_for(": capturing", 1)
        udp_traffic(h1, h2, port=5005, count=10)
        time.sleep(0.5)
        status = cli.finish()

    assert status == 1
    assert list(markers.iterdir()) == []
    # Each refused by tcpdump, word for word, as its target's failure (in the summary).
    assert cli.stderr.count("can't parse filter expression: syntax error]") == len(HOSTILE)
    assert len(cli.records()) == 10, cli.stderr


def test_changed_or_unknown_host_key_fails_that_target_by_name_and_starts_nothing(
    site: SshSite, tmp_path: Path
) -> None:
    with Fleet(3) as fleet:
        h1, h2, h3 = fleet.hosts
        site.serve(h1, wrong_key=True)
        site.serve(h2, known=False)
        site.serve(h3)
        cli = Cli(site, [ssh_url(h) for h in (h1, h2, h3)], tmp_path / "out.pcap")
        cli.wait_for(": capturing", 1)
        udp_traffic(h3, h2, port=5006, count=5)
        time.sleep(0.5)
        assert tcpdumps(h1, wait=0) == [] and tcpdumps(h2, wait=0) == []
        status = cli.finish()

    assert status == 1
    assert (
        f" {h1.address}: host key verification failed for {h1.address} "
        "(its key changed since it was stored)"
    ) in cli.stderr
    assert (
        f" {h2.address}: host key verification failed for {h2.address} (its key is not known)"
    ) in cli.stderr
    assert len(cli.records()) == 5


def test_target_whose_sshd_is_killed_fails_and_the_others_go_on(
    site: SshSite, tmp_path: Path
) -> None:
    with Fleet(3) as fleet:
        h1, h2, h3 = fleet.hosts
        for host in fleet.hosts:
            site.serve(host)
        cli = Cli(site, [ssh_url(h) for h in fleet.hosts], tmp_path / "out.pcap")
        cli.wait_for(": capturing", 3)
        udp_traffic(h1, h2, port=5007, count=50)

        listener = site.listener(h3)
        for pid in h3.pids():
            if _command(pid) == "sshd" and pid != listener:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        cli.wait_for(f" {h3.address}: ")
        after = udp_traffic(h1, h2, port=5008, count=50)
        time.sleep(0.5)
        left_on_h3 = tcpdumps(h3)
        status = cli.finish()

    assert status == 1
    assert left_on_h3 == []
    seen = udp_flows(cli.records())
    assert all(seen[(5008, seq)] == [PACKET_OUTGOING, 0] for seq in range(len(after.sent)))
    assert f"{h3.address}" in cli.stderr and "[failed:" in cli.stderr


def test_ctrl_c_on_a_quiet_filter_leaves_no_remote_tcpdump_after_1_s(
    site: SshSite, tmp_path: Path
) -> None:
    with Fleet(1) as fleet:
        (h1,) = fleet.hosts
        site.serve(h1)
        cli = Cli(site, [ssh_url(h1, "udp port 9")], tmp_path / "out.pcap")
        cli.wait_for(": capturing")
        assert tcpdumps(h1, wait=0) != []

        cli.process.send_signal(signal.SIGINT)
        stopped = time.monotonic()
        left = tcpdumps(h1, wait=1)
        took = time.monotonic() - stopped
        status = cli.finish(signum=None)

    assert left == [], f"tcpdump still running {took:.2f} s after Ctrl-C"
    assert status == 0, cli.stderr
    assert cli.records() == []


def test_twenty_targets_on_one_host_all_capture(site: SshSite, tmp_path: Path) -> None:
    ports = range(6000, 6020)
    with Fleet(2) as fleet:
        h1, h2 = fleet.hosts
        site.serve(h1)  # sshd's defaults: MaxStartups 10:30:100, MaxSessions 10
        targets = [ssh_url(h1, f"udp dst port {port}") for port in ports]
        cli = Cli(site, targets, tmp_path / "out.pcap")
        cli.wait_for(": capturing", len(ports), timeout=30)
        for port in ports:
            udp_traffic(h2, h1, port=port, count=3, rate=1000, sink=False)
        time.sleep(0.5)
        status = cli.finish()

    assert status == 0, cli.stderr
    seen = udp_flows(cli.records())
    assert dict(seen) == {(port, seq): [0] for port in ports for seq in range(3)}


def test_sudo_that_wants_a_password_and_a_user_who_may_not_capture_fail_at_once(
    site: SshSite, tmp_path: Path
) -> None:
    with Fleet(1) as fleet:
        (h1,) = fleet.hosts
        site.serve(h1)
        started = time.monotonic()
        cli = Cli(
            site,
            [ssh_url(h1, user=PLAIN_USER), ssh_url(h1, user=PLAIN_USER, sudo=False)],
            tmp_path / "out.pcap",
        )
        status = cli.finish(signum=None, timeout=20)
        took = time.monotonic() - started

    assert status == 1
    assert took < 10, cli.stderr
    assert "sudo: a password is required" in cli.stderr
    assert "NOPASSWD: /usr/bin/tcpdump" in cli.stderr
    assert "the login user may not capture: add ?sudo=1" in cli.stderr


def test_pcapng_names_an_ssh_hosts_interfaces_host_colon_iface(
    site: SshSite, tmp_path: Path
) -> None:
    tshark = require_tool("tshark")
    with Fleet(2) as fleet:
        h1, h2 = fleet.hosts
        site.serve(h1)
        cli = Cli(site, [ssh_url(h1)], tmp_path / "out.pcapng")
        cli.wait_for(": capturing")
        udp_traffic(h1, h2, port=5009, count=5)
        time.sleep(0.5)
        status = cli.finish()

    fields = subprocess.run(
        [tshark, "-r", str(cli.out), "-T", "fields", "-e", "frame.interface_name"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert status == 0, cli.stderr
    assert fields.stdout.split() == [f"{h1.address}:eth0"] * 5, fields.stderr


def test_count_in_the_url_ends_that_target_normally(site: SshSite, tmp_path: Path) -> None:
    with Fleet(2) as fleet:
        h1, h2 = fleet.hosts
        site.serve(h1)
        cli = Cli(site, [ssh_url(h1) + "&count=3"], tmp_path / "out.pcap")
        cli.wait_for(": capturing")
        udp_traffic(h1, h2, port=5010, count=10)
        status = cli.finish(signum=None)

    assert status == 0, cli.stderr
    assert f" {h1.address}: ended (3 packets)" in cli.stderr
    assert len(cli.records()) == 3


def test_a_remote_tcpdump_stopped_before_its_count_fails_that_target(
    site: SshSite, tmp_path: Path
) -> None:
    with Fleet(2) as fleet:
        h1, h2 = fleet.hosts
        site.serve(h1)
        cli = Cli(site, [ssh_url(h1) + "&count=1000"], tmp_path / "out.pcap")
        cli.wait_for(": capturing")
        udp_traffic(h1, h2, port=5011, count=5)
        time.sleep(0.3)
        for pid in tcpdumps(h1):  # stopped on that host: it exits cleanly, short of its count
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        status = cli.finish(signum=None)

    assert status == 1, cli.stderr
    assert "[failed: its tcpdump ended unasked" in cli.stderr
    assert "not captured from " in cli.stderr and "the capture is partial" in cli.stderr
    assert len(cli.records()) == 5


def test_closed_stdout_ends_quietly_and_leaves_no_remote_tcpdump(site: SshSite) -> None:
    with Fleet(2) as fleet:
        h1, h2 = fleet.hosts
        site.serve(h1)
        ddump = subprocess.Popen(
            [sys.executable, "-m", "ddump.cli.main", ssh_url(h1)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            env=site.env,
        )  # fmt: skip
        reader = subprocess.Popen(
            ["tcpdump", "-c", "5", "-nn", "-r", "-"],
            stdin=ddump.stdout, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert ddump.stdout is not None
        ddump.stdout.close()
        deadline = time.monotonic() + 20
        while not tcpdumps(h1, wait=0) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        udp_traffic(h1, h2, port=5011, count=20)

        lines, _ = reader.communicate(timeout=20)
        _, err = ddump.communicate(timeout=20)
        left = tcpdumps(h1, wait=1)

    assert len(lines.decode().splitlines()) == 5
    assert ddump.returncode == 0, err
    assert left == []


def test_ddump_killed_outright_leaves_no_remote_tcpdump(site: SshSite, tmp_path: Path) -> None:
    with Fleet(1) as fleet:
        (h1,) = fleet.hosts
        site.serve(h1)
        # Its control socket's directory stays behind (nothing runs to remove it): in tmp_path.
        env = {"TMPDIR": str(tmp_path)}
        cli = Cli(site, [ssh_url(h1, "udp port 9")], tmp_path / "out.pcap", env)
        cli.wait_for(": capturing")
        assert tcpdumps(h1, wait=0) != []

        cli.process.kill()  # no cleanup of its own: its ssh processes die with it
        cli.finish(signum=None)
        left = tcpdumps(h1, wait=2)

    assert left == []


def _ssh_children(pid: int) -> list[int]:
    """The ssh processes ddump (pid) started."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            comm, ppid = (
                stat[stat.index("(") + 1 : stat.rindex(")")],
                stat.rsplit(")", 1)[1].split()[1],
            )
            if comm == "ssh" and int(ppid) == pid:
                found.append(int(entry))
    return found


def test_a_target_alone_on_its_host_is_one_ssh_process_and_two_share_a_master(
    site: SshSite, tmp_path: Path
) -> None:
    with Fleet(2) as fleet:
        h1, h2 = fleet.hosts
        site.serve(h1)
        site.serve(h2)
        # h1 alone: its capture is its connection. h2 twice: one master and two sessions.
        urls = [ssh_url(h1), ssh_url(h2, "udp port 5001"), ssh_url(h2, "udp port 5002")]
        cli = Cli(site, urls, tmp_path / "out.pcap")
        cli.wait_for(": capturing", n=3)
        processes = len(_ssh_children(cli.process.pid))
        status = cli.finish()
        left = tcpdumps(h1, wait=1) + tcpdumps(h2, wait=1)

    assert processes == 1 + 3, cli.stderr
    assert status == 0, cli.stderr
    assert left == []


def test_a_cli_short_of_cpu_writes_every_ssh_packet_in_order_and_none_late(
    site: SshSite, tmp_path: Path
) -> None:
    """An ssh:// capture's stdout pipe is in the probe of unread bytes: a CLI stopped 150 ms of
    every 180 (SIGSTOP) while three hosts send holds the merge for what waits in its pipes
    (--max-delay 50ms), and writes nothing late."""
    count, rate = 800, 400
    with Fleet(3) as fleet:
        h1, h2, h3 = fleet.hosts
        for host in fleet.hosts:
            site.serve(host)
        targets = [ssh_url(host) for host in fleet.hosts]
        cli = Cli(site, ["--max-delay", "50ms", *targets], tmp_path / "out.pcap")
        cli.wait_for(": capturing", 3)
        stop = threading.Event()

        def starve() -> None:
            while not stop.is_set():
                os.kill(cli.process.pid, signal.SIGSTOP)
                try:
                    stop.wait(0.15)
                finally:
                    os.kill(cli.process.pid, signal.SIGCONT)
                stop.wait(0.03)

        flows = [(h1, h2, 5001), (h2, h3, 5002), (h3, h1, 5003)]
        starver = threading.Thread(target=starve, daemon=True)
        starver.start()
        try:
            with concurrent.futures.ThreadPoolExecutor(len(flows)) as pool:
                sent = {
                    port: pool.submit(
                        udp_traffic,
                        src,
                        dst,
                        port=port,
                        count=count,
                        rate=rate,
                        src_port=port - 1000,
                    )
                    for src, dst, port in flows
                }
                received = {port: future.result().received for port, future in sent.items()}
        finally:
            stop.set()
            starver.join(5)
        time.sleep(0.5)
        status = cli.finish()
    records = cli.records()

    assert status == 0, cli.stderr
    assert "late" not in cli.stderr, cli.stderr
    stamps = [ts for ts, _ in records]
    assert stamps == sorted(stamps)
    seen = udp_flows(records)
    for port in received:
        assert received[port] == count
        for seq in range(count):
            assert seen[(port, seq)] == [PACKET_OUTGOING, 0], (port, seq)
