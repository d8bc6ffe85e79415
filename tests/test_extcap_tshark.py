"""The real tshark with ddump installed in a personal extcap folder, as `ddump-extcap --install`
puts it: tshark lists it, registers its options, captures two hosts' workers in network
namespaces through it, shows its errors, and leaves no capture running when it ends.

Each test gives tshark a HOME of its own (and no XDG_CONFIG_HOME), which is where Wireshark 4.0
(~/.config/wireshark/extcap) and 4.2+ (~/.local/lib/wireshark/extcap) look for personal extcaps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ddump.extcap_config import OPTIONS
from tests.conftest import require_root, require_tool
from tests.netns import Fleet, Host, WorkerProcess, udp_traffic, worker_argv

PORT = 8475
TSHARK_START_S = 30  # tshark asks every extcap on the machine first: seconds, on a busy one

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A HOME with ddump installed by `ddump-extcap --install`."""
    require_tool("tshark")
    home = tmp_path / "home"
    home.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "ddump.extcap", "--install"],
        env=tshark_env(home), capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "installed " in done.stdout
    return home


def tshark_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    return {**env, "HOME": str(home)}


def tshark(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["tshark", *args], env=tshark_env(home), capture_output=True, text=True, timeout=timeout
    )


def test_install_says_where_and_tshark_lists_ddump(home: Path) -> None:
    listed = tshark(home, "-D")

    assert "ddump (Merged capture of ddump-workers)" in listed.stdout, listed.stderr
    installed = list(home.rglob("extcap/ddump"))
    assert len(installed) == 1 and os.access(installed[0], os.X_OK)


def test_tshark_registers_a_preference_for_every_option(home: Path) -> None:
    prefs = tshark(home, "-G", "defaultprefs").stdout

    for option in OPTIONS:
        assert f"#extcap.ddump.{option.name.replace('-', '')}:" in prefs, option.call
    assert "#extcap.ddump.maxdelay: 250ms" in prefs


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["-o", "extcap.ddump.targets:http://127.0.0.1:1"], "127.0.0.1:1: connection refused"),
        (["-o", "extcap.ddump.targets:htp://web-1"], "bad target URL htp://web-1"),
        (["-o", "extcap.ddump.inventory:/nonexistent.yaml"], "/nonexistent.yaml: cannot read"),
        ([], "no targets: fill in Targets or Inventory file"),
    ],
)
def test_a_bad_target_or_inventory_is_an_error_from_tshark_within_seconds(
    home: Path, options: list[str], message: str
) -> None:
    start = time.monotonic()
    done = tshark(home, "-i", "ddump", *options, "-c", "1", timeout=TSHARK_START_S + 10)

    assert f"Error by extcap pipe: ddump: {message}" in done.stderr
    assert time.monotonic() - start < TSHARK_START_S
    assert "Traceback" not in done.stderr


# ---- two hosts, a worker on each ----


@dataclass
class Workers:
    hosts: list[Host]
    workers: list[WorkerProcess]

    def inventory(self, path: Path) -> Path:
        """Group "pair" holds both workers; group "elsewhere" a host nobody listens on."""
        a, b = (h.address for h in self.hosts)
        path.write_text(
            f"defaults:\n  port: {PORT}\ngroups:\n  pair:\n    - {a}\n    - {b}\n"
            "  elsewhere:\n    - 127.0.0.1:1\n"
        )
        return path

    def wait_capturing(self, timeout: float = TSHARK_START_S) -> None:
        for worker in self.workers:
            worker.wait_log(" start:", timeout)
        time.sleep(0.3)  # tcpdump is listening once the worker answered

    def tcpdumps_left(self) -> list[int]:
        """tcpdump processes still running in the hosts, after up to 3 s for them to end."""
        deadline = time.monotonic() + 3
        while True:
            found = [pid for host in self.hosts for pid in host.pids() if _comm(pid) == "tcpdump"]
            if not found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


def _comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return None


@pytest.fixture
def fleet() -> Iterator[Workers]:
    require_root()
    require_tool("ip")
    require_tool("tcpdump")
    with Fleet(2) as fleet:
        workers = [WorkerProcess(worker_argv("--listen", f":{PORT}"), h) for h in fleet.hosts]
        try:
            for worker in workers:
                worker.wait_listening()
            yield Workers(fleet.hosts, workers)
        finally:
            for worker in workers:
                worker.__exit__()


def start_tshark(home: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["tshark", "-i", "ddump", *args], env=tshark_env(home), text=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def test_tshark_captures_an_inventory_group_each_packet_named_by_its_host(
    home: Path, fleet: Workers, tmp_path: Path
) -> None:
    h1, h2 = fleet.hosts
    inventory = fleet.inventory(tmp_path / "fleet.yaml")
    run = start_tshark(
        home, "-o", f"extcap.ddump.inventory:{inventory}", "-o", "extcap.ddump.group:pair",
        "-f", "udp port 5000", "-c", "20",
        "-T", "fields", "-e", "frame.interface_name", "-e", "udp.dstport", "-e", "ip.src",
    )  # fmt: skip
    fleet.wait_capturing()
    udp_traffic(h1, h2, port=5000, count=10, rate=200)
    out, err = run.communicate(timeout=30)

    rows = [line.split("\t") for line in out.splitlines()]
    assert run.returncode == 0, err
    assert len(rows) == 20, err
    assert {name for name, _, _ in rows} == {
        f"{h1.address}:{PORT}:eth0",
        f"{h2.address}:{PORT}:eth0",
    }
    assert {(port, src) for _, port, src in rows} == {("5000", h1.address)}
    assert "Error by extcap" not in err
    for worker in fleet.workers:
        assert "client closed" in worker.wait_log(" end:", 10)
    assert fleet.tcpdumps_left() == []


def test_stopping_tshark_stops_every_remote_capture_and_the_extcap(
    home: Path, fleet: Workers, tmp_path: Path
) -> None:
    h1, h2 = fleet.hosts
    targets = " ".join(f"http://{h.address}:{PORT}" for h in fleet.hosts)
    run = start_tshark(
        home, "-o", f"extcap.ddump.targets:{targets}", "-f", "udp port 5001",
        "-w", str(tmp_path / "out.pcapng"),
    )  # fmt: skip
    fleet.wait_capturing()
    extcaps = _extcap_pids()
    udp_traffic(h2, h1, port=5001, count=5, rate=200)
    time.sleep(0.5)
    run.send_signal(signal.SIGINT)  # Ctrl-C: tshark stops its extcap (SIGTERM, FIFO closed)
    _, err = run.communicate(timeout=30)

    assert "Error by extcap" not in err, err
    for worker in fleet.workers:
        assert "client closed" in worker.wait_log(" end:", 10)
    assert fleet.tcpdumps_left() == []
    assert extcaps and all(_gone(pid, 10) for pid in extcaps)
    read = ["tshark", "-r", str(tmp_path / "out.pcapng"), "-T", "fields"]
    names = subprocess.run(
        [*read, "-e", "frame.interface_name"], capture_output=True, text=True, timeout=60
    ).stdout.split()
    assert sorted(set(names)) == sorted(f"{h.address}:{PORT}:eth0" for h in (h1, h2))
    assert len(names) == 10


def test_sigterm_then_fifo_close_ends_the_capture_with_statistics_and_a_silent_stderr(
    fleet: Workers, tmp_path: Path
) -> None:
    """What Wireshark does at Stop, done by hand to see what the extcap writes to its FIFO."""
    capinfos = require_tool("capinfos")
    h1, h2 = fleet.hosts
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    targets = " ".join(f"http://{h.address}:{PORT}" for h in fleet.hosts)
    extcap = subprocess.Popen(
        [sys.executable, "-m", "ddump.extcap", "--extcap-interface", "ddump", "--capture",
         "--fifo", str(fifo), "--targets", targets, "--extcap-capture-filter", "udp port 5002"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    with open(fifo, "rb") as reader:  # as dumpcap does; the extcap opens it before all else
        fleet.wait_capturing()
        udp_traffic(h1, h2, port=5002, count=5, rate=200)
        time.sleep(0.5)
        extcap.send_signal(signal.SIGTERM)
        data = reader.read()  # to the end: the extcap closed it after its statistics
    _, err = extcap.communicate(timeout=20)
    (tmp_path / "out.pcapng").write_bytes(data)

    assert extcap.returncode == 0 and err == ""
    info = subprocess.run(
        [capinfos, str(tmp_path / "out.pcapng")], capture_output=True, text=True, timeout=60
    ).stdout
    names = [line.split("= ")[1] for line in info.splitlines() if "Name = " in line]
    assert f"{h1.address}:{PORT}:eth0" in names and f"{h2.address}:{PORT}:eth0" in names
    assert info.count("Number of stat entries = 1") == len(names)
    assert "Number of packets:   10" in info
    assert fleet.tcpdumps_left() == []


def _extcap_pids() -> list[int]:
    """Running ddump extcaps (the launcher runs `from ddump.extcap import main`)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(arg.endswith(b"/extcap/ddump") for arg in cmdline) and b"--capture" in cmdline:
                pids.append(int(entry.name))
    return pids


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or _comm(pid) is None:
            return True
        time.sleep(0.05)
    return False
