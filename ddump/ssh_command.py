"""What runs for an `ssh://` target: the ssh command lines and the remote sh script (pure).

The remote login shell only ever sees the constant `exec sh -s`: the script itself goes to sh
on ssh's standard input, so its quoting is POSIX sh's alone, whatever the user's login shell
is. The user's filter is one single-quoted assignment in it, and reaches tcpdump as one
double-quoted argument: nothing in a filter is ever run. After the script, standard input stays
open and silent; its end (ddump closing it, or the connection dying) makes the script stop
tcpdump at once, even when no packet ever matched.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping

from ddump.ssh_targets import SshTarget
from ddump.worker.filter import DEFAULT_BUFFER_KIB, tcpdump_argv
from ddump.worker.tcpdump import error_lines, stats_counts

REMOTE_COMMAND = "exec sh -s"
INTERFACE_MARK = "ddump-interface"
CLOCK_MARK = "ddump-clock"
NO_CONNECTION_STATUS = 120  # the script's own exit status: $SSH_CONNECTION was not set
KEEPALIVE_S = 5  # ServerAliveInterval: a dead connection is noticed within 3 of these

_CLOCK_LINE = re.compile(rf"^{CLOCK_MARK} (\d{{10,}})$")
_INTERFACE_LINE = re.compile(rf"^{INTERFACE_MARK} (\d+) (.+)$")
# Lines that only tell what ssh did, not what went wrong.
_SSH_NOISE = (
    "Warning: Permanently added",
    "Could not chdir to home directory",  # sshd's, for accounts without one
)
# ssh's word that a session ended: chatter, except when it ended unasked (connection_lost).
_SSH_CHATTER = (*_SSH_NOISE, "Connection to ", "Shared connection to ")


def ssh_base_argv(
    target: SshTarget, control_path: str | None, connect_timeout_s: float
) -> list[str]:
    """Options common to the connection and its sessions; ssh keeps the first value given.

    control_path None: the user's own ControlPath, if their configuration has one.
    """
    argv = ["ssh", "-o", "BatchMode=yes"]
    if control_path is not None:
        argv += ["-o", f"ControlPath={control_path}"]
    argv += ["-e", "none"]
    for option in target.ssh_options:
        argv += ["-o", option]
    argv += [
        "-o",
        f"ConnectTimeout={max(1, round(connect_timeout_s))}",
        "-o",
        f"ServerAliveInterval={KEEPALIVE_S}",
        "-o",
        "ServerAliveCountMax=3",
    ]
    if target.port is not None:
        argv += ["-p", str(target.port)]
    if target.user is not None:
        argv += ["-l", target.user]
    return argv


def master_argv(target: SshTarget, control_path: str, connect_timeout_s: float) -> list[str]:
    """The shared connection: no command, a control socket for the sessions."""
    base = ssh_base_argv(target, control_path, connect_timeout_s)
    return [*base, "-N", "-o", "ControlMaster=yes", "-o", "ControlPersist=no", "--", target.host]


def session_argv(
    target: SshTarget, control_path: str | None, connect_timeout_s: float
) -> list[str]:
    """One capture, over the shared connection; the script comes on standard input.

    control_path None: over the user's own master if one listens at their ControlPath, else
    (or without one) on a connection of its own; never a master for others (ControlMaster=no).
    """
    base = ssh_base_argv(target, control_path, connect_timeout_s)
    return [*base, "-T", "-o", "ControlMaster=no", "--", target.host, REMOTE_COMMAND]


def config_argv(target: SshTarget) -> list[str]:
    """`ssh -G`: the configuration ssh would use for target, printed (nothing connects)."""
    argv = ["ssh", "-G", "-T"]
    for option in target.ssh_options:
        argv += ["-o", option]
    if target.port is not None:
        argv += ["-p", str(target.port)]
    if target.user is not None:
        argv += ["-l", target.user]
    return [*argv, "--", target.host]


def configured_control_path(config_text: str) -> str | None:
    """The ControlPath in `ssh -G` output (tokens expanded by ssh), None if there is none."""
    for line in config_text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key.lower() == "controlpath":
            value = value.strip()
            return None if value in ("", "none") else value
    return None


def tcpdump_words(target: SshTarget) -> str:
    """The remote tcpdump command, shell-quoted, its filter the variable `$f`.

    The same arguments as a worker's capture (ddump/worker/filter.py), ring size included.
    """
    argv = tcpdump_argv(
        "tcpdump",
        "$f",
        snaplen=target.snaplen,
        count=target.count,
        buffer_kib=DEFAULT_BUFFER_KIB,
        batch=target.batch,
    )
    words = [shlex.quote(word) for word in argv[:-1]] + ['"$f"']
    if target.sudo:
        words = ["sudo", "-n", "--", *words]
    return " ".join(words)


def remote_script(target: SshTarget) -> str:
    """The POSIX sh script that captures, written to `sh -s` on the remote host.

    One brace group, so that sh has read all of it before anything runs (standard input is
    read on after it, to learn when to stop).
    """
    user_filter = ""
    composed = '"$x"'
    if target.filter is not None:
        user_filter = f"u={shlex.quote(target.filter)}\n"
        composed = '"$x and ($u)"'
    return (
        "{\n"
        'PATH="$PATH:/usr/sbin:/sbin"\n'
        # This session's own packets, both ways: else each captured packet would make more.
        "set -f; set -- $SSH_CONNECTION; set +f\n"
        'if [ "$#" -ne 4 ]; then\n'
        "  echo 'ddump: $SSH_CONNECTION is not set: cannot keep this session out of the "
        "capture' >&2\n"
        f"  exit {NO_CONNECTION_STATUS}\n"
        "fi\n"
        'x="not (host $1 and host $3 and tcp port $2 and tcp port $4)"\n'
        f"{user_filter}"
        f"f={composed}\n"
        "for d in /sys/class/net/*; do\n"
        '  i=; read -r i < "$d/ifindex" 2>/dev/null'
        f' && printf \'{INTERFACE_MARK} %s %s\\n\' "$i" "${{d##*/}}" >&2\n'
        "done\n"
        f"printf '{CLOCK_MARK} %s\\n' \"$(date +%s%N)\" >&2\n"
        "exec 3<&0\n"
        f"{tcpdump_words(target)} </dev/null 3<&- &\n"
        "p=$!\n"
        '{ while read -r _ <&3; do :; done; kill -TERM "$p" 2>/dev/null; } &\n'
        "w=$!\n"
        'wait "$p"; s=$?\n'
        'kill "$w" 2>/dev/null\n'
        'exit "$s"\n'
        "}\n"
    )


def read_clock(line: str) -> int | None:
    """The remote clock in ns from the script's clock line; None if not one (or no %N)."""
    match = _CLOCK_LINE.match(line.strip())
    return int(match.group(1)) if match else None


def read_interface(line: str) -> tuple[int, str] | None:
    """(ifindex, name) from one of the script's interface lines, else None."""
    match = _INTERFACE_LINE.match(line.rstrip("\n"))
    return (int(match.group(1)), match.group(2)) if match else None


def is_script_line(line: str) -> bool:
    return line.startswith((CLOCK_MARK + " ", INTERFACE_MARK + " "))


def interfaces_of(lines: list[str]) -> Mapping[int, str]:
    found = (read_interface(line) for line in lines)
    return dict(item for item in found if item is not None)


SUDOERS_HINT = (
    "allow tcpdump alone without a password, e.g. in /etc/sudoers.d/ddump: "
    "`USER ALL=(root) NOPASSWD: /usr/bin/tcpdump` (USER: the login user)"
)
PERMISSION_HINT = (
    "the login user may not capture: add ?sudo=1 (--sudo, inventory `sudo: true`) to run "
    "tcpdump with sudo, or log in as a user who may capture"
)


def connection_failure(host: str, stderr_text: str, status: int | None) -> str:
    """Why ssh could not connect to `host` (or lost the connection), with what to do."""
    text = _ssh_lines(stderr_text)
    if "Host key verification failed" in stderr_text:
        changed = "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr_text
        why = "its key changed since it was stored" if changed else "its key is not known"
        return (
            f"host key verification failed for {host} ({why}): check the key, then connect "
            "once with ssh to record it in known_hosts (ddump never accepts keys)"
        )
    if "Permission denied" in stderr_text:
        return (
            f"{text}: check the user, your key (ssh-agent, IdentityFile in ~/.ssh/config) "
            "and the host's authorized_keys"
        )
    return text or f"ssh exited with status {status} before connecting"


def connection_lost(host: str, stderr_text: str, status: int | None) -> str:
    """Why a capture that had started ended with its SSH connection (ssh's own status 255):
    ssh's last words (e.g. "Connection to HOST closed by remote host."), not tcpdump's."""
    lines = [
        line.strip()
        for line in stderr_text.splitlines()
        if error_lines(line)  # not tcpdump's "listening on", link type or counts
        and not is_script_line(line)
        and not line.startswith(_SSH_NOISE)
    ]
    said = f": {'; '.join(lines[-2:])}" if lines else f" (ssh exited with status {status})"
    return f"the SSH connection to {host} was lost{said}"


def session_failure(stderr_text: str, status: int | None) -> str:
    """Why the remote capture failed: tcpdump's (or sudo's) own words, and the fix."""
    lines = [
        line
        for line in stderr_text.splitlines()
        if not is_script_line(line) and not line.startswith(_SSH_CHATTER)
    ]
    message = error_lines("\n".join(lines)) or _ssh_lines(stderr_text)
    lowered = message.lower()
    if "sudo:" in lowered and ("password" in lowered or "terminal" in lowered or "tty" in lowered):
        return f"{message}\nsudo asks for a password: {SUDOERS_HINT}"
    if "sudo:" in lowered and ("not allowed" in lowered or "sudoers" in lowered):
        return f"{message}\nsudo refuses tcpdump: {SUDOERS_HINT}"
    if status == 127 or "not found" in lowered:
        return (
            f"{message or 'command not found'}\n"
            "tcpdump (or sudo) is not installed on the host, or not in PATH, /usr/sbin or /sbin"
        )
    if "permission" in lowered or "not permitted" in lowered:
        return f"tcpdump cannot open the capture: {message}\n{PERMISSION_HINT}"
    if message:
        return message
    return f"the remote capture exited with status {status}"


def _ssh_lines(stderr_text: str) -> str:
    lines = [
        line.strip()
        for line in stderr_text.splitlines()
        if line.strip() and not line.startswith(_SSH_CHATTER) and not is_script_line(line)
    ]
    return "; ".join(lines[-3:])


def is_stats_line(line: str) -> bool:
    return bool(stats_counts(line))
