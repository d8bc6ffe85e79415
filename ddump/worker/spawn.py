"""What runs in the forked child before tcpdump is executed: parent-death signal, privileges.

The parent-death signal is what stops tcpdump when the worker is SIGKILLed (nothing else could).
The kernel clears it whenever the child's user or group id changes, and tcpdump started as
root drops to its own user by itself, after our prctl. So when the worker runs as root, the
child drops to that user first, keeps only CAP_NET_RAW, and sets the signal after.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import signal
from collections.abc import Callable

PR_SET_PDEATHSIG = 1
PR_SET_KEEPCAPS = 8
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
CAP_NET_RAW = 13
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# Who tcpdump runs as when the worker is root: tcpdump's own choice on Debian, else nobody.
UNPRIVILEGED_USERS = ("tcpdump", "nobody")


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def unprivileged_user() -> pwd.struct_passwd | None:
    """The account tcpdump should run as when the worker is root (None: no such account)."""
    for name in UNPRIVILEGED_USERS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    return None


def child_setup(drop_to: pwd.struct_passwd | None) -> Callable[[], None]:
    """A preexec_fn: optionally become `drop_to` keeping CAP_NET_RAW, then arm SIGKILL on
    parent death. Runs between fork and exec, so it only makes system calls."""
    libc = _libc()
    parent = os.getpid()

    def setup() -> None:
        if drop_to is not None:
            _drop_privileges(libc, drop_to.pw_uid, drop_to.pw_gid)
        _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
        # The worker may have died between fork and the prctl: then nobody would kill us.
        if os.getppid() != parent:
            os._exit(1)

    return setup


def _drop_privileges(libc: ctypes.CDLL, uid: int, gid: int) -> None:
    _check(libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(KEEPCAPS)")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    # After setuid only the permitted set survives (KEEPCAPS); make CAP_NET_RAW effective and
    # inheritable, then ambient, which is what carries it across exec of a plain binary.
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    bit = 1 << CAP_NET_RAW
    data[0].effective = data[0].permitted = data[0].inheritable = bit
    _check(libc.capset(ctypes.byref(header), ctypes.byref(data)), "capset")
    _check(
        libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_NET_RAW, 0, 0),
        "prctl(CAP_AMBIENT_RAISE)",
    )
