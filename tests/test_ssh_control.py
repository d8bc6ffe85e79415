"""The control sockets' directory: a run removes what dead ddump processes left, and only that."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ddump.cli.ssh_connections import USER_MASTER_SESSIONS, SshConnections
from ddump.cli.ssh_control import make_directory, remove_stale
from ddump.ssh_targets import parse_ssh_target
from tests.conftest import require_root
from tests.netns import Fleet
from tests.sshd import SshSite
from tests.test_ssh_live import Cli, site, ssh_url

__all__ = ["site"]  # the live tests' fixture: real sshd, keys and the client's config


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited (and was reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.fixture
def live_pid() -> Iterator[int]:
    process = subprocess.Popen(["sleep", "30"])
    yield process.pid
    process.kill()
    process.wait()


def _left_by(root: Path, pid: int, suffix: str = "k3j_x9") -> Path:
    """A directory as a ddump with `pid` leaves it when killed: a master's socket in it."""
    directory = root / f"ddump-ssh-{pid}-{suffix}"
    directory.mkdir(mode=0o700)
    (directory / "1").write_text("")  # stands for the socket
    return directory


def test_directory_of_a_dead_ddump_is_removed(tmp_path: Path, dead_pid: int) -> None:
    stale = _left_by(tmp_path, dead_pid)

    assert remove_stale(str(tmp_path)) == [str(stale)]
    assert not stale.exists()


def test_directories_of_running_processes_stay(tmp_path: Path, live_pid: int) -> None:
    running = _left_by(tmp_path, live_pid)
    mine = _left_by(tmp_path, os.getpid())

    assert remove_stale(str(tmp_path)) == []
    assert running.exists() and mine.exists()


def test_other_names_files_and_links_stay(tmp_path: Path, dead_pid: int) -> None:
    others = [tmp_path / "ddump-ssh-abc", tmp_path / "ddump-sshd-x", tmp_path / "other"]
    for path in others:
        path.mkdir()
    a_file = tmp_path / f"ddump-ssh-{dead_pid}-file1"
    a_file.write_text("")
    # A link named like a stale directory, to a directory that must not be touched.
    target = tmp_path / "keep"
    target.mkdir()
    (target / "data").write_text("kept")
    link = tmp_path / f"ddump-ssh-{dead_pid}-link1"
    link.symlink_to(target)

    assert remove_stale(str(tmp_path)) == []
    assert all(path.exists() for path in others)
    assert a_file.exists() and link.is_symlink()
    assert (target / "data").read_text() == "kept"


def test_a_directory_whose_socket_a_master_still_serves_stays(
    tmp_path: Path, dead_pid: int
) -> None:
    # Its ddump may run in another pid namespace sharing this directory: its pid means nothing.
    serving = tmp_path / f"ddump-ssh-{dead_pid}-ns1"
    serving.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX) as master:
        master.bind(str(serving / "1"))
        master.listen()

        assert remove_stale(str(tmp_path)) == []
        assert serving.exists()

    assert remove_stale(str(tmp_path)) == [str(serving)]  # closed: its socket is a leftover


def test_another_users_directory_stays(tmp_path: Path, dead_pid: int) -> None:
    require_root()  # to give it away
    theirs = _left_by(tmp_path, dead_pid)
    os.chown(theirs, 65534, 65534)

    assert remove_stale(str(tmp_path)) == []
    assert theirs.exists()


def test_a_new_directory_is_private_names_its_process_and_sweeps_first(
    tmp_path: Path, dead_pid: int
) -> None:
    stale = _left_by(tmp_path, dead_pid)

    made = Path(make_directory(str(tmp_path)))

    assert not stale.exists()
    assert made.parent == tmp_path
    assert made.name.startswith(f"ddump-ssh-{os.getpid()}-")
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    assert remove_stale(str(tmp_path)) == []  # its own stays


def test_a_run_after_a_kill_9_removes_the_killed_runs_directory(
    site: SshSite, tmp_path: Path
) -> None:
    env = {"TMPDIR": str(tmp_path)}
    with Fleet(1) as fleet:
        (h1,) = fleet.hosts
        site.serve(h1)
        # Two targets on one host: a shared master, its socket in ddump's directory.
        urls = [ssh_url(h1, "udp port 5001"), ssh_url(h1, "udp port 5002")]
        killed = Cli(site, urls, tmp_path / "killed.pcap", env)
        killed.wait_for(": capturing", n=2)
        left = [p.name for p in tmp_path.glob("ddump-ssh-*")]
        killed.process.kill()
        killed.finish(signum=None)
        assert left == [p.name for p in tmp_path.glob("ddump-ssh-*")]  # it stayed

        later = Cli(site, urls, tmp_path / "later.pcap", env)
        later.wait_for(": capturing", n=2)
        during = sorted(p.name for p in tmp_path.glob("ddump-ssh-*"))
        status = later.finish()

    assert left == [f"ddump-ssh-{killed.process.pid}-" + left[0].rsplit("-", 1)[1]]
    assert during == [p for p in during if p.startswith(f"ddump-ssh-{later.process.pid}-")]
    assert len(during) == 1
    assert status == 0, later.stderr
    assert list(tmp_path.glob("ddump-ssh-*")) == []


@pytest.fixture
def fake_ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An `ssh` first on PATH whose `-G` shows a ControlPath; each call is counted."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    ssh = bin_dir / "ssh"
    ssh.write_text(
        f'#!/bin/sh\necho "$*" >> {calls}\n'
        f'[ "$1" = -G ] && printf "user ops\\ncontrolmaster auto\\ncontrolpath {tmp_path}/cm\\n"\n'
    )
    ssh.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return calls


def test_the_users_master_is_found_once_per_destination_and_only_while_it_listens(
    tmp_path: Path, fake_ssh: Path
) -> None:
    connections = SshConnections()
    target = parse_ssh_target("ssh://ops@web-1")

    async def sessions_on_theirs() -> list[tuple[str, bool, int]]:
        got = [await connections.acquire(target, 5) for _ in range(USER_MASTER_SESSIONS)]
        found = [(c.control_path, c.owned, c.capacity) for c in got]
        for connection in got:
            await connections.release(connection)  # the user's master: nothing to stop
        return found

    not_listening = asyncio.run(connections.user_master(target))
    with socket.socket(socket.AF_UNIX) as master:
        master.bind(str(tmp_path / "cm"))
        master.listen()
        listening = asyncio.run(connections.user_master(target))  # another event loop
        on_theirs = asyncio.run(sessions_on_theirs())

    assert not_listening is None
    assert listening == str(tmp_path / "cm")
    assert set(on_theirs) == {(str(tmp_path / "cm"), False, USER_MASTER_SESSIONS)}
    assert len(on_theirs) == USER_MASTER_SESSIONS
    assert fake_ssh.read_text().splitlines() == ["-G -T -l ops -- web-1"]  # once, nothing else
