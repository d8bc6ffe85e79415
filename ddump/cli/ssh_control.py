"""SSH control sockets: the user's own master, ddump's private directory and its stale ones.

The user's master: when their ssh configuration (`ssh -G`) names a ControlPath and a master
listens there (`ControlMaster auto` with `ControlPersist`, or an `ssh -M` of theirs), captures
open their sessions on it, as the user's own ssh commands would: no new connection, no new
authentication. ddump never starts a master at the user's path: with ControlPersist it would
outlive ddump, and without it ddump would end it, and with it any session of the user's on it.

ddump removes its directory when its last shared connection closes; a `kill -9` of ddump (or
a crash) leaves it behind, with the dead masters' sockets in it. The directory's name carries
the pid of the ddump that made it (`ddump-ssh-PID-RANDOM`), so a later run removes those of
processes that are gone: only directories (never a link), only the user's own, only when no
process with that pid runs and no master listens on a socket in it. A pid reused since by
another process keeps its directory until that process ends too: leaving an empty directory
is harmless, removing a live one is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile

from ddump.ssh_command import config_argv, configured_control_path
from ddump.ssh_targets import SshTarget
from ddump.worker.spawn import child_setup

PREFIX = "ddump-ssh-"
CONFIG_TIMEOUT_S = 5.0  # `ssh -G` reads files only (and runs the user's `Match exec`)
_NAME = re.compile(rf"^{PREFIX}(\d+)-[A-Za-z0-9_]+$")


def make_directory(root: str | None = None) -> str:
    """A new private (0700) directory for this process's control sockets, after removing the
    stale ones of dead ddump processes from the same place."""
    root = root if root is not None else tempfile.gettempdir()
    remove_stale(root)
    return tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root)


def remove_stale(root: str) -> list[str]:
    """Remove the control directories in `root` left by ddump processes that are gone;
    returns the paths removed."""
    removed = []
    with contextlib.suppress(OSError), os.scandir(root) as entries:
        for entry in entries:
            match = _NAME.match(entry.name)
            if match is None or not _is_own_directory(entry.path):
                continue
            if _alive(int(match.group(1))) or _serving(entry.path):
                continue
            shutil.rmtree(entry.path, ignore_errors=True)  # fd-based: follows no link
            removed.append(entry.path)
    return removed


def _is_own_directory(path: str) -> bool:
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()


def _serving(directory: str) -> bool:
    """Whether a master still listens on a socket in directory (its ddump may run in another
    pid namespace that shares this temporary directory, where its pid means nothing)."""
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        return any(
            stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode)
            and master_listening(entry.path)
            for entry in entries
        )
    return False


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive
    except OverflowError:
        return False  # not a pid at all
    return True


async def user_control_path(target: SshTarget) -> str | None:
    """The ControlPath of the user's ssh configuration for target; None if none (or if
    `ssh -G` fails: then the connection's own ssh reports what is wrong)."""
    try:
        process = await asyncio.create_subprocess_exec(
            *config_argv(target),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=child_setup(None),
        )
    except OSError:
        return None
    try:
        out, _ = await asyncio.wait_for(process.communicate(), CONFIG_TIMEOUT_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        return None
    if process.returncode != 0:
        return None
    return configured_control_path(out.decode("utf-8", "replace"))


def master_listening(path: str) -> bool:
    """Whether an ssh master accepts connections on the control socket at path (a socket file
    left by a dead master refuses them)."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
        probe.settimeout(1.0)
        probe.connect(path)
        return True
    return False
