"""The private directory of ddump's SSH control sockets, and the removal of stale ones.

ddump removes its directory when its last shared connection closes; a `kill -9` of ddump (or
a crash) leaves it behind, with the dead masters' sockets in it. The directory's name carries
the pid of the ddump that made it (`ddump-ssh-PID-RANDOM`), so a later run removes those of
processes that are gone: only directories (never a link), only the user's own, and only when
no process with that pid runs. A pid reused since by another process keeps its directory until
that process ends too: leaving an empty directory is harmless, removing a live one is not.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile

PREFIX = "ddump-ssh-"
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
            if _alive(int(match.group(1))):
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
