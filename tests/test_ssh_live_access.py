"""`ssh://` targets reached as users reach hosts: through a jump host, with keys in ssh-agent,
and a capture that comes back after its session was killed (`--reconnect`). Real sshd in
network namespace hosts (tests/sshd.py)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.netns import Fleet, Host, udp_traffic
from tests.sshd import CAP_USER, SshSite
from tests.test_partial_captures import clock, gaps
from tests.test_ssh_live import (
    PACKET_OUTGOING,
    Cli,
    _command,
    site,
    ssh_url,
    tcpdumps,
    udp_flows,
)

__all__ = ["site"]  # the live tests' fixture: real sshd, keys and the client's config


def _sessions_on(host: Host) -> list[str]:
    """The peers (address:port) of the established connections to host's sshd."""
    out = host.run(
        ["ss", "-Htn", "state", "established", "sport", "= :22"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    return [line.split()[-1] for line in out.splitlines()]


@pytest.mark.parametrize("configured_in", ["ssh_config", "inventory"])
def test_a_target_behind_a_jump_host_captures_through_it(
    site: SshSite, tmp_path: Path, configured_in: str
) -> None:
    with Fleet(3) as fleet:
        jump, inner, other = fleet.hosts
        site.serve(jump)
        # The inner host takes logins from the jump host only: a direct connection fails.
        site.serve(inner, extra=f"AllowUsers {CAP_USER}@{jump.address}\n")
        if configured_in == "ssh_config":
            with site.config.open("a") as config:
                config.write(f"Host {inner.address}\n  ProxyJump {jump.address}\n")
            args = [ssh_url(inner)]
        else:
            inventory = tmp_path / "fleet.yaml"
            inventory.write_text(
                "defaults:\n  scheme: ssh\n  sudo: true\n  filter: udp\n"
                f"  ssh_options: [ProxyJump={jump.address}]\n"
                f"targets:\n  - {inner.address}\n"
            )
            args = ["-f", str(inventory)]
        cli = Cli(site, args, tmp_path / "out.pcap")
        cli.wait_for(": capturing")
        peers = _sessions_on(inner)
        sent = udp_traffic(other, inner, port=5001, count=30)
        time.sleep(0.5)
        status = cli.finish()
        left = tcpdumps(inner)

    assert status == 0, cli.stderr
    assert [peer.rsplit(":", 1)[0] for peer in peers] == [jump.address]
    seen = udp_flows(cli.records())
    assert all(seen[(5001, seq)] == [0] for seq in range(len(sent.sent)))
    assert left == []


@pytest.fixture
def agent(site: SshSite) -> Iterator[dict[str, str]]:
    """An ssh-agent holding the site's client key: its SSH_AUTH_SOCK, for the CLI's env."""
    require_tool("ssh-agent")
    socket_path = site.dir / "agent.sock"
    process = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket_path)])
    try:
        deadline = time.monotonic() + 10
        while not socket_path.exists():
            assert process.poll() is None and time.monotonic() < deadline, "no agent"
            time.sleep(0.02)
        env = {"SSH_AUTH_SOCK": str(socket_path)}
        subprocess.run(
            ["ssh-add", "-q", str(site.client_key)],
            env={**os.environ, **env},
            check=True,
            timeout=10,
        )
        yield env
    finally:
        process.terminate()
        process.wait(10)


def test_a_key_in_ssh_agent_is_used_without_any_identity_file(
    site: SshSite, agent: dict[str, str], tmp_path: Path
) -> None:
    # The user's configuration names no key: only the agent has it.
    config = site.config.read_text()
    site.config.write_text(
        "".join(line for line in config.splitlines(True) if "Identit" not in line)
    )
    with Fleet(2) as fleet:
        h1, h2 = fleet.hosts
        site.serve(h1)
        without = Cli(site, [ssh_url(h1)], tmp_path / "without.pcap", {"SSH_AUTH_SOCK": ""})
        without_status = without.finish(signum=None)

        cli = Cli(site, [ssh_url(h1)], tmp_path / "out.pcap", agent)
        cli.wait_for(": capturing")
        sent = udp_traffic(h2, h1, port=5001, count=30)
        time.sleep(0.5)
        status = cli.finish()

    assert without_status == 1
    assert f"{h1.address}: " in without.stderr and "Permission denied" in without.stderr
    assert status == 0, cli.stderr
    seen = udp_flows(cli.records())
    assert all(seen[(5001, seq)] == [0] for seq in range(len(sent.sent)))


def _session_processes(site: SshSite, host: Host) -> list[int]:
    """The host's sshd processes serving a session (not the listener)."""
    listener = site.listener(host)
    return [pid for pid in host.pids() if _command(pid) == "sshd" and pid != listener]


def test_reconnect_brings_a_killed_ssh_session_back_and_tells_the_gap(
    site: SshSite, tmp_path: Path
) -> None:
    with Fleet(2) as fleet:
        h1, h2 = fleet.hosts
        site.serve(h1)
        cli = Cli(site, ["--reconnect", ssh_url(h1)], tmp_path / "out.pcap")
        cli.wait_for(": capturing")
        before = udp_traffic(h2, h1, port=5001, count=20, rate=1000)
        time.sleep(0.3)
        killed = time.time()
        for pid in _session_processes(site, h1):  # as a crash or an admin's kill would
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        cli.wait_for(": capturing", n=2)
        back = time.time()
        after = udp_traffic(h2, h1, port=5002, count=20, rate=1000)
        time.sleep(0.5)
        status = cli.finish()
        left = tcpdumps(h1)

    assert status == 1, cli.stderr
    (gap,) = gaps(cli.stderr)
    assert gap.cause.startswith(f"the SSH connection to {h1.address} was lost"), gap
    assert killed - 0.1 < clock(gap.start) < killed + 2, cli.stderr
    assert clock(gap.end) <= back + 0.1 and back - killed < 5, cli.stderr
    assert "1 gap, " in cli.stderr and "the capture is partial" in cli.stderr
    assert re.search(r"retrying in 0\.25 s", cli.stderr), cli.stderr
    seen = udp_flows(cli.records())
    assert all(seen[(5001, seq)] == [0] for seq in range(len(before.sent)))
    assert all(seen[(5002, seq)] == [0] for seq in range(len(after.sent)))
    assert left == []
    assert PACKET_OUTGOING not in {t for types in seen.values() for t in types}
