"""Real OpenSSH servers in network namespace hosts, and a client setup that trusts them.

    with Fleet(2) as fleet, SshSite() as site:
        site.serve(fleet.hosts[0])               # sshd on 198.18.S.1:22, its own host key
        env = site.env                           # PATH: an `ssh` that reads site's config
        ... ddump ssh://198.18.S.1 ...           # as CAP_USER, whose sudo allows tcpdump

Everything is made by the test: host keys, the client key, known_hosts, an ssh_config standing
for the user's ~/.ssh/config (User, IdentityFile, UserKnownHostsFile), and two accounts:
CAP_USER may run tcpdump with sudo and no password (the README's sudoers line), PLAIN_USER's
sudo asks for a password. Needs root, sshd, ssh-keygen and sudo.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tests.netns import Host

CAP_USER = "ddump-cap"
PLAIN_USER = "ddump-plain"
SUDOERS = Path("/etc/sudoers.d/ddump-tests")
SSHD = "/usr/sbin/sshd"


def _keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ddump-test", "-f", str(path)],
        check=True,
        timeout=30,
    )
    return path.with_suffix(".pub").read_text().strip()


def ensure_accounts() -> list[str]:
    """The two test accounts, able to log in with a key only, and their sudo rules; returns
    the accounts it created (remove_accounts undoes it)."""
    created = []
    for user in (CAP_USER, PLAIN_USER):
        try:
            pwd.getpwnam(user)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "-M", "-d", "/nonexistent", "-s", "/bin/sh", user],
                check=True,
                timeout=30,
            )
            created.append(user)
        # "*": no password, but not locked ("!"), which would refuse key logins as well.
        subprocess.run(["usermod", "-p", "*", user], check=True, timeout=30)
    tcpdump = shutil.which("tcpdump") or "/usr/bin/tcpdump"
    rules = (
        f"{CAP_USER} ALL=(root) NOPASSWD: {tcpdump}\n"  # the README's line
        f"{PLAIN_USER} ALL=(root) {tcpdump}\n"  # sudo would ask this one for a password
    )
    if not SUDOERS.exists() or SUDOERS.read_text() != rules:
        SUDOERS.write_text(rules)
        SUDOERS.chmod(0o440)
    return created


def remove_accounts(created: list[str]) -> None:
    """Leave the machine as it was: the sudo rules, and the accounts the tests made."""
    SUDOERS.unlink(missing_ok=True)
    for user in created:
        subprocess.run(["userdel", user], check=False, timeout=30, capture_output=True)


class SshSite:
    """Keys, client configuration and the sshd processes of one test."""

    def __init__(self, client_lines: Sequence[str] = ()) -> None:
        self.client_lines = list(client_lines)  # first in the client's ssh_config
        # Not pytest's tmp_path: sshd reads authorized keys as the user, who must reach them.
        self.dir = Path(tempfile.mkdtemp(prefix="ddump-sshd-"))
        self.servers: dict[str, subprocess.Popen[bytes]] = {}

    def __enter__(self) -> SshSite:
        self.created_accounts = ensure_accounts()
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation
        self.dir.chmod(0o755)
        self.host_key = self.dir / "host_key"
        self.host_pub = _keygen(self.host_key)
        self.other_host_key = self.dir / "other_host_key"
        _keygen(self.other_host_key)
        self.client_key = self.dir / "client_key"
        client_pub = _keygen(self.client_key)
        keys = self.dir / "authorized"
        keys.mkdir(mode=0o755)
        for user in (CAP_USER, PLAIN_USER):
            (keys / user).write_text(client_pub + "\n")
            (keys / user).chmod(0o644)
        self.known_hosts = self.dir / "known_hosts"
        self.known_hosts.write_text("")
        self.config = self.dir / "ssh_config"
        self.config.write_text(
            "".join(line + "\n" for line in self.client_lines) + "Host *\n"
            f"  User {CAP_USER}\n"
            f"  IdentityFile {self.client_key}\n"
            "  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {self.known_hosts}\n"
            "  GlobalKnownHostsFile /dev/null\n"
            "  LogLevel ERROR\n"
        )
        bin_dir = self.dir / "bin"
        bin_dir.mkdir()
        wrapper = bin_dir / "ssh"
        # The system ssh with this config in place of ~/.ssh/config (ssh ignores $HOME).
        wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {self.config} "$@"\n')
        wrapper.chmod(0o755)
        self.env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
        return self

    def serve(
        self,
        host: Host,
        *,
        wrong_key: bool = False,
        known: bool = True,
        port: int = 22,
        extra: str = "",
    ) -> None:
        """Start sshd on host; known_hosts holds its key (another one if wrong_key; none if
        not known); `extra`: more sshd_config lines."""
        config = self.dir / f"sshd_{host.name}"
        config.write_text(
            f"ListenAddress {host.address}:{port}\n"
            f"HostKey {self.other_host_key if wrong_key else self.host_key}\n"
            f"AuthorizedKeysFile {self.dir}/authorized/%u\n"
            f"PidFile {self.dir}/sshd_{host.name}.pid\n"
            "UsePAM no\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PermitRootLogin no\n"
            "StrictModes no\n"
            "LogLevel ERROR\n"
            f"{extra}"
        )
        log = open(self.dir / f"sshd_{host.name}.log", "wb")  # noqa: SIM115 (the process's)
        process = host.popen([SSHD, "-D", "-e", "-f", str(config)], stderr=log)
        self.servers[host.name] = process
        if known:
            with self.known_hosts.open("a") as hosts:
                hosts.write(f"{host.address} {self.host_pub}\n")
        deadline = time.monotonic() + 10
        while not self._listening(host, port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd on {host.name} did not start: {self.log(host)}")
            time.sleep(0.05)

    def _listening(self, host: Host, port: int) -> bool:
        with contextlib.suppress(OSError), socket.create_connection((host.address, port), 1):
            return True
        return False

    def log(self, host: Host) -> str:
        path = self.dir / f"sshd_{host.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def listener(self, host: Host) -> int:
        """The pid of the listening sshd (the rest of the host's sshd are its sessions)."""
        return int((self.dir / f"sshd_{host.name}.pid").read_text())

    def __exit__(self, *exc: object) -> None:
        for process in self.servers.values():
            if process.poll() is None:
                process.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)
        remove_accounts(self.created_accounts)
