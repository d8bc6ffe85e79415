"""The user's own ControlMaster: ddump's captures ride on it when it runs, and never start one.

The user's ~/.ssh/config (the site's ssh_config) names a ControlPath with `ControlMaster auto`,
as the OpenSSH manual suggests for connection sharing.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns import Fleet, Host, udp_traffic
from tests.sshd import SshSite
from tests.test_ssh_live import Cli, _ssh_children, site, ssh_url, tcpdumps, udp_flows

__all__ = ["site"]  # the live tests' fixture: real sshd, keys and the client's config


@pytest.fixture
def user_path(site: SshSite) -> Path:
    """The site's client configured for connection sharing: the directory of its sockets."""
    path = site.dir / "cm"
    path.mkdir()
    with site.config.open("a") as config:  # still in its `Host *`
        config.write(f"  ControlMaster auto\n  ControlPath {path}/%r@%h:%p\n")
    return path


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    with Fleet(2) as fleet:
        yield fleet


def _connections_to(host: Host) -> int:
    """Established TCP connections from this (the root) namespace to host's sshd."""
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", "dst", f"{host.address}:22"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    return len(out.splitlines())


def _user_master(site: SshSite, user_path: Path, host: Host) -> subprocess.Popen[bytes]:
    """The user's own `ssh -M -N HOST`, its socket in the user's ControlPath."""
    master = subprocess.Popen(["ssh", "-M", "-N", host.address], env=site.env)
    deadline = time.monotonic() + 10
    while not any(user_path.iterdir()):
        assert master.poll() is None and time.monotonic() < deadline, "no user master"
        time.sleep(0.02)
    return master


@pytest.mark.parametrize("n_targets", [1, 2])
def test_captures_use_the_users_running_master_and_leave_it_running(
    site: SshSite, user_path: Path, fleet: Fleet, tmp_path: Path, n_targets: int
) -> None:
    h1, h2 = fleet.hosts
    site.serve(h1)
    master = _user_master(site, user_path, h1)
    try:
        urls = [ssh_url(h1, f"udp port {5001 + i}") for i in range(n_targets)]
        cli = Cli(site, urls, tmp_path / "out.pcap")
        cli.wait_for(": capturing", n=n_targets)
        connections = _connections_to(h1)
        processes = len(_ssh_children(cli.process.pid))
        sent = udp_traffic(h2, h1, port=5001, count=20)
        time.sleep(0.5)
        status = cli.finish()
        master_after = master.poll()
    finally:
        master.terminate()
        master.wait(10)

    assert status == 0, cli.stderr
    assert connections == 1  # the user's master's, and no other
    assert processes == n_targets  # one session each, no master of ddump's
    assert master_after is None  # ddump left it running
    assert all(udp_flows(cli.records())[(5001, seq)] == [0] for seq in range(len(sent.sent)))
    assert tcpdumps(h1) == []


@pytest.mark.parametrize("n_targets", [1, 2])
def test_without_a_running_master_ddump_connects_itself_and_starts_none_there(
    site: SshSite, user_path: Path, fleet: Fleet, tmp_path: Path, n_targets: int
) -> None:
    h1, h2 = fleet.hosts
    site.serve(h1)
    urls = [ssh_url(h1, f"udp port {5001 + i}") for i in range(n_targets)]
    cli = Cli(site, urls, tmp_path / "out.pcap")
    cli.wait_for(": capturing", n=n_targets)
    at_users_path = list(user_path.iterdir())
    sent = udp_traffic(h2, h1, port=5001, count=20)
    time.sleep(0.5)
    status = cli.finish()

    assert status == 0, cli.stderr
    assert at_users_path == []
    assert all(udp_flows(cli.records())[(5001, seq)] == [0] for seq in range(len(sent.sent)))
    assert tcpdumps(h1) == []
