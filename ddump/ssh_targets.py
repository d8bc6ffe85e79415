"""`ssh://` targets: capture where only SSH reaches, with no worker installed (pure: no I/O).

    ssh://[USER@]HOST[:PORT][?filter=F&snaplen=N&count=N&duration=S&batch=1&sudo=1]

The system `ssh` client runs tcpdump on HOST (see ddump/ssh_command.py), so the user's
~/.ssh/config, agent and known_hosts apply: no password may appear here, and a missing USER or
PORT is left to that configuration rather than filled in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import quote, unquote, unquote_plus

from ddump.errors import UsageError
from ddump.protocol import BATCH_PARAM, flag_value
from ddump.targets import split_host_port
from ddump.worker.filter import FilterError, check_parentheses
from ddump.worker.params import parse_query

SSH_SCHEME = "ssh"
SUDO_PARAM = "sudo"
_PREFIX = "ssh://"
# ssh's -o takes `Key=Value` or `Key Value`; a key is letters and digits.
_OPTION_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
# Options ddump sets itself (a prompt would hang the capture; the control socket is ddump's):
# given first on the command line, they win over the user's anyway (ssh keeps the first value);
# refusing them says so instead of silently ignoring them.
RESERVED_OPTIONS = ("batchmode", "controlmaster", "controlpath", "controlpersist")


@dataclass(frozen=True)
class SshTarget:
    """One capture over SSH: where, as whom, and what tcpdump is asked for."""

    name: str  # display name: HOST or HOST:PORT
    host: str  # a name from ~/.ssh/config works as well as a DNS name or an address
    user: str | None = None  # None: ssh's default (the config's User, else the local user)
    port: int | None = None  # None: ssh's default (the config's Port, else 22)
    filter: str | None = None
    snaplen: int | None = None
    count: int | None = None
    duration_ns: int | None = None
    batch: bool = False
    sudo: bool = False  # run tcpdump with `sudo -n`
    ssh_options: tuple[str, ...] = field(default=())  # `-o` values, in order

    @property
    def url(self) -> str:
        """The target as a URL (for messages and pcapng descriptions); no secret in it."""
        user = f"{quote(self.user, safe='')}@" if self.user else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = f":{self.port}" if self.port is not None else ""
        query = [(k, v) for k, v in self._query() if v is not None]
        tail = "&".join(f"{k}={quote(v, safe='')}" for k, v in query)
        return f"{_PREFIX}{user}{host}{port}" + (f"?{tail}" if tail else "")

    def _query(self) -> list[tuple[str, str | None]]:
        duration = None
        if self.duration_ns is not None:
            whole, part = divmod(self.duration_ns, 10**9)
            duration = f"{whole}.{part:09d}".rstrip("0").rstrip(".")
        return [
            ("filter", self.filter),
            ("snaplen", None if self.snaplen is None else str(self.snaplen)),
            ("count", None if self.count is None else str(self.count)),
            ("duration", duration),
            (BATCH_PARAM, "1" if self.batch else None),
            (SUDO_PARAM, "1" if self.sudo else None),
        ]


def is_ssh_url(text: str) -> bool:
    """Whether a target argument is an `ssh://` URL (any case)."""
    return text.strip()[: len(_PREFIX)].lower() == _PREFIX


def parse_ssh_target(text: str, *, default_filter: str | None = None) -> SshTarget:
    """Parse `ssh://...`; raises UsageError naming the URL (which never holds a password)."""
    text = text.strip()
    if not is_ssh_url(text):
        raise UsageError(f"not an ssh:// URL: {text!r}")
    try:
        return _parse(text[len(_PREFIX) :], default_filter)
    except UsageError as error:
        shown = text if "@" not in text.partition("?")[0] else _hide_userinfo(text)
        raise UsageError(f"bad target URL {shown}: {error}") from None


def _hide_userinfo(text: str) -> str:
    authority = text[len(_PREFIX) :].partition("?")[0].partition("/")[0]
    userinfo, _, rest = authority.rpartition("@")
    user = userinfo.partition(":")[0]
    return _PREFIX + (f"{user}:***@" if ":" in userinfo else f"{user}@") + rest


def _parse(rest: str, default_filter: str | None) -> SshTarget:
    if "#" in rest:
        raise UsageError("a URL fragment ('#...') is not allowed; write '#' in a filter as %23")
    rest, _, query = rest.partition("?")
    authority, _, path = rest.partition("/")
    if path:
        raise UsageError("an ssh:// target has no path: capture options go in ?filter=... etc.")
    userinfo, at, hostport = authority.rpartition("@")
    user = None
    if at:
        if ":" in userinfo:
            raise UsageError(
                "no password in an ssh:// URL (it would show in the process list): ssh uses "
                "your keys, ssh-agent and ~/.ssh/config; `ssh-copy-id` installs a key"
            )
        user = unquote(userinfo)
        if not user or user.startswith("-") or any(c.isspace() for c in user):
            raise UsageError(f"bad user {user!r}")
    host, port = split_host_port(hostport, "ssh")
    options = _query(query)
    sudo = _flag(options.pop(SUDO_PARAM, None), SUDO_PARAM)
    try:
        params = parse_query({k: [v.encode()] for k, v in options.items()})
    except FilterError as error:
        message = str(error).replace("accepted: ", f"accepted: {SUDO_PARAM} (0 or 1), ")
        raise UsageError(message) from None
    capture_filter = params.filter if "filter" in options else default_filter
    return SshTarget(
        name=host if port is None else f"{host}:{port}",
        host=host,
        user=user,
        port=port,
        filter=check_ssh_filter(capture_filter),
        snaplen=params.snaplen,
        count=params.count,
        duration_ns=params.duration_ns,
        batch=params.batch,
        sudo=sudo,
    )


def check_ssh_filter(text: str | None) -> str | None:
    """The filter stripped (None if empty); UsageError if tcpdump could not take it safely."""
    if text is None or not text.strip():
        return None
    if "\x00" in text:
        raise UsageError("the filter contains a NUL byte")
    try:
        check_parentheses(text)
    except FilterError as error:
        raise UsageError(str(error)) from None
    return text.strip()


def _query(query: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for part in query.split("&") if query else ():
        key, equals, value = (unquote_plus(p) for p in part.partition("="))
        if not equals or not key:
            raise UsageError(f"bad query parameter {part!r} (a '&' in a filter is written %26)")
        if key in values:
            raise UsageError(f"query parameter {key!r} is given twice")
        values[key] = value
    return values


def _flag(text: str | None, name: str) -> bool:
    if text is None:
        return False
    value = flag_value(text)
    if value is None:
        raise UsageError(f"{name} must be 0 or 1, got {text!r}")
    return value


def check_ssh_option(text: str) -> str:
    """One `-o` value, `Key=Value` or `Key Value`; UsageError for what ddump must set itself."""
    key = text.strip().replace("=", " ").split(" ", 1)[0]
    if not key or not set(key) <= _OPTION_KEY_CHARS or "\n" in text:
        raise UsageError(f"bad ssh option {text!r}: expected Key=Value, e.g. ProxyJump=bastion")
    if key.lower() in RESERVED_OPTIONS:
        raise UsageError(
            f"ssh option {key} is set by ddump (BatchMode=yes, so that nothing prompts; its "
            "own control socket, so that targets on one host share a connection)"
        )
    return text.strip()
