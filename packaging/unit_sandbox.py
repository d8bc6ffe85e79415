#!/usr/bin/python3
"""Apply a unit file's seccomp sandboxing to this process, then exec a command.

packaging/deb-test.sh runs the packaged worker without systemd as PID 1. setpriv and unshare
give it the unit's user, capabilities and mounts; this gives it what they cannot, read from the
unit itself so that the test follows the unit: SystemCallFilter= with SystemCallErrorNumber=,
RestrictAddressFamilies= and MemoryDenyWriteExecute= (through PR_SET_MDWE, Linux >= 6.3).

Usage: unit_sandbox.py UNIT_FILE -- COMMAND [ARG...]        (needs python3-seccomp)
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import subprocess
import sys

import seccomp  # type: ignore[import-not-found]  # Debian's python3-seccomp

PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1
AF_MAX = 46  # one past the highest address family Linux 6.x knows


def service_settings(path: str) -> list[tuple[str, str]]:
    """The [Service] section's key=value lines, in order (keys may repeat)."""
    settings, section = [], ""
    with open(path, encoding="utf-8") as unit:
        for raw in unit:
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line
            elif section == "[Service]":
                key, _, value = line.partition("=")
                settings.append((key.strip(), value.strip()))
    return settings


def expand(name: str) -> set[str]:
    """A system call, or every call in a @group as systemd-analyze lists it."""
    if not name.startswith("@"):
        return {name}
    listing = subprocess.run(
        ["systemd-analyze", "syscall-filter", name], capture_output=True, text=True, check=True
    ).stdout.splitlines()[1:]  # the first line is the group's name
    calls: set[str] = set()
    for line in listing:
        item = line.strip()
        if item and not item.startswith("#"):
            calls |= expand(item)
    return calls


def allowed_calls(values: list[str]) -> set[str]:
    """systemd's reading of SystemCallFilter= lines that start with an allow list: later `~`
    lines remove from it, later plain lines add to it."""
    if not values or values[0].startswith("~"):
        sys.exit("unit_sandbox: only an allow-list SystemCallFilter= is emulated")
    allowed: set[str] = set()
    for value in values:
        deny = value.startswith("~")
        for name in value.removeprefix("~").split():
            allowed = allowed - expand(name) if deny else allowed | expand(name)
    return allowed


def build_filter(settings: list[tuple[str, str]]) -> seccomp.SyscallFilter:
    values = [value for key, value in settings if key == "SystemCallFilter" and value]
    error_name = dict(settings).get("SystemCallErrorNumber", "EPERM")
    refused = seccomp.ERRNO(getattr(errno, error_name))
    families = {
        getattr(socket, name)
        for key, value in settings
        if key == "RestrictAddressFamilies"
        for name in value.split()
    }
    syscalls = seccomp.SyscallFilter(defaction=refused)
    for call in sorted(allowed_calls(values)):
        if call == "socket" and families:
            continue
        # A call this architecture does not have: systemd skips them too.
        with contextlib.suppress(RuntimeError, ValueError):
            syscalls.add_rule(seccomp.ALLOW, call)
    if families:
        # As systemd does it: socket() of any other family fails with EAFNOSUPPORT.
        for family in range(AF_MAX):
            action = seccomp.ALLOW if family in families else seccomp.ERRNO(errno.EAFNOSUPPORT)
            syscalls.add_rule(action, "socket", seccomp.Arg(0, seccomp.EQ, family))
        syscalls.add_rule(
            seccomp.ERRNO(errno.EAFNOSUPPORT), "socket", seccomp.Arg(0, seccomp.GE, AF_MAX)
        )
    return syscalls


def main(argv: list[str]) -> None:
    if len(argv) < 4 or argv[2] != "--":
        sys.exit(__doc__)
    settings = service_settings(argv[1])
    if dict(settings).get("MemoryDenyWriteExecute") == "yes":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
            sys.exit(f"unit_sandbox: PR_SET_MDWE: {os.strerror(ctypes.get_errno())}")
    build_filter(settings).load()
    os.execv(argv[3], argv[3:])


if __name__ == "__main__":
    main(sys.argv)
