"""The SSH connections that targets on one host share: ddump's own ControlMasters (or the
user's running one), by destination, at most SESSIONS_PER_CONNECTION sessions each.

Targets on one host share one SSH connection (an `ssh -N` ControlMaster on a control socket in
a private directory ddump creates and removes, ssh_control.py), sshd's default MaxSessions
captures each: 20 targets on one host open 2 connections, not 20, so sshd's MaxStartups (10
unauthenticated connections by default, then random refusals) is never near.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from ddump.cli.sources import StreamFailure
from ddump.cli.ssh_control import make_directory, master_listening, user_control_path
from ddump.ssh_command import connection_failure, master_argv
from ddump.ssh_targets import SshTarget
from ddump.worker.spawn import child_setup

SESSIONS_PER_CONNECTION = 10  # sshd's default MaxSessions
# Of sshd's default 10 sessions per connection, what ddump takes on the user's own master:
# some of theirs (a shell, a copy) may be on it too. More captures go on ddump's own masters.
USER_MASTER_SESSIONS = SESSIONS_PER_CONNECTION - 2
STDERR_KEEP = 64 * 1024
STOP_GRACE_S = 2.0  # for the remote tcpdump to stop and print its counts, then ssh is killed
_SOCKET_POLL_S = 0.01


def connection_key(target: SshTarget) -> tuple[object, ...]:
    """Targets with the same key may share one connection."""
    return (target.user, target.host, target.port, target.ssh_options)


def shares_connection(target: SshTarget, targets: Iterable[object]) -> bool:
    """Whether another of `targets` goes to the same destination as `target`."""
    key = connection_key(target)
    same = sum(1 for t in targets if isinstance(t, SshTarget) and connection_key(t) == key)
    return same > 1


async def spawn(
    argv: list[str], *, stdin: int, stdout: int = subprocess.DEVNULL
) -> asyncio.subprocess.Process:
    try:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=stdin,
            stdout=stdout,
            stderr=subprocess.PIPE,
            start_new_session=True,  # not the terminal's Ctrl-C: ddump stops it, in order
            preexec_fn=child_setup(None),  # killed if ddump dies
        )
    except FileNotFoundError:
        raise StreamFailure(
            "the ssh client is not installed (Debian: apt install openssh-client)"
        ) from None


async def read_all(stream: asyncio.StreamReader | None) -> str:
    if stream is None:
        return ""
    data = await stream.read(STDERR_KEEP)
    return data.decode("utf-8", "replace")


@dataclass(eq=False)
class Connection:
    """One shared SSH connection and how many captures use it."""

    key: tuple[object, ...]
    control_path: str
    capacity: int = SESSIONS_PER_CONNECTION
    owned: bool = True  # False: the user's own master, which ddump neither starts nor stops
    users: int = 0
    process: asyncio.subprocess.Process | None = None
    ready: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    failed: bool = False
    starting: asyncio.Task[None] | None = None  # referenced while it runs

    async def start(self, target: SshTarget, timeout_s: float) -> None:
        try:
            self.process = await spawn(
                master_argv(target, self.control_path, timeout_s), stdin=subprocess.DEVNULL
            )
            await self._wait_for_socket(target, timeout_s)
        except StreamFailure as failure:
            self.failed = True
            self.ready.set_exception(failure)
            self.ready.exception()  # retrieved: nobody may be waiting any more
        else:
            self.ready.set_result(None)

    async def _wait_for_socket(self, target: SshTarget, timeout_s: float) -> None:
        assert self.process is not None
        # ssh binds the control socket once the connection is authenticated.
        deadline = time.monotonic() + timeout_s + 5  # ssh's own ConnectTimeout comes first
        while not os.path.exists(self.control_path):
            if self.process.returncode is not None or time.monotonic() > deadline:
                if self.process.returncode is None:
                    self.stop()
                status = await self.process.wait()
                stderr = await read_all(self.process.stderr)
                raise StreamFailure(connection_failure(target.host, stderr, status))
            await asyncio.sleep(_SOCKET_POLL_S)

    def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()

    async def stopped(self) -> None:
        """Stop the connection and wait for ssh to exit (killed after STOP_GRACE_S)."""
        self.stop()
        if self.process is None:
            return
        try:
            await asyncio.wait_for(self.process.wait(), STOP_GRACE_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()


class SshConnections:
    """The shared connections, by destination (user, host, port and ssh options)."""

    def __init__(self) -> None:
        self._directory: str | None = None
        self._by_key: dict[tuple[object, ...], list[Connection]] = {}
        self._made = 0
        self._user_paths: dict[tuple[object, ...], str | None] = {}  # by destination
        self._lookups: dict[tuple[object, ...], asyncio.Future[str | None]] = {}

    async def user_master(self, target: SshTarget) -> str | None:
        """The control socket of the user's own master for target's destination if one is
        listening now (`ssh -G` once per destination, shared by its targets)."""
        key = connection_key(target)
        if key in self._user_paths:
            path = self._user_paths[key]
        else:
            lookup = self._lookups.get(key)
            if lookup is None or lookup.get_loop() is not asyncio.get_running_loop():
                lookup = self._lookups[key] = asyncio.ensure_future(user_control_path(target))
            path = self._user_paths[key] = await asyncio.shield(lookup)
            self._lookups.pop(key, None)
        return path if path is not None and master_listening(path) else None

    async def acquire(self, target: SshTarget, timeout_s: float) -> Connection:
        """A connection with room for one more session (made if needed), once it is up: the
        user's own master first, when one is listening."""
        key = connection_key(target)
        theirs = await self.user_master(target)
        pool = self._by_key.setdefault(key, [])
        connection = next((c for c in pool if c.users < c.capacity and not c.failed), None)
        if connection is None and theirs is not None and all(c.owned for c in pool):
            connection = Connection(key, theirs, USER_MASTER_SESSIONS, owned=False)
            connection.ready.set_result(None)
            pool.append(connection)
        if connection is None:
            if self._directory is None:
                self._directory = make_directory()
            self._made += 1
            connection = Connection(key, os.path.join(self._directory, str(self._made)))
            pool.append(connection)
            connection.starting = asyncio.get_running_loop().create_task(
                connection.start(target, timeout_s), name=f"ssh connection to {target.host}"
            )
        connection.users += 1
        try:
            await asyncio.shield(connection.ready)
        except BaseException:
            await self.release(connection)
            raise
        return connection

    async def release(self, connection: Connection) -> None:
        """One session less; the last one closes the connection (and waits for it)."""
        connection.users -= 1
        if connection.users > 0:
            return
        pool = self._by_key.get(connection.key, [])
        if connection in pool:
            pool.remove(connection)
        if not pool:
            self._by_key.pop(connection.key, None)
        if not self._by_key and self._directory is not None:
            # ssh removes its socket as it exits; the directory is ddump's to remove.
            directory, self._directory = self._directory, None
        else:
            directory = None
        await connection.stopped()
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


CONNECTIONS = SshConnections()
