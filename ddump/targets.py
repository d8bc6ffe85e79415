"""Target URLs: the grammar users know from the Go ddump, its defaults, and password redaction.

    http|https://[user[:password]@]host[:port][path][?filter=F&other=V...]

Pure code: no I/O. Every error is a UsageError whose message never holds a password.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol, TypeVar
from urllib.parse import quote, unquote, unquote_plus

from ddump.errors import UsageError
from ddump.protocol import DEFAULT_PORT

DEFAULT_PATH = "/capture"
SCHEMES = ("http", "https")

# Long filters would make every stderr line unreadable; the "#n" suffix keeps names unique.
_NAME_FILTER_MAX = 32
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_.])?")
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(//)?")
# A URL runs until whitespace or a character that cannot appear unencoded in one (quotes
# around it in a message). Its userinfo ends at the LAST "@" of that run: a careless
# "p@ss" password is hidden whole, at the price of over-redacting a rare "@" in a path.
_URL_RE = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)([^\s'\"<>`]*)")
# Characters that may stay as they are in a path; "%" keeps existing escapes intact.
_PATH_SAFE = "/%:@!$&'()*+,;=~"


@dataclass(frozen=True)
class Target:
    """One capture stream: where to ask for it, and how to authenticate."""

    name: str  # display name; never contains a password
    url: str  # request URL without credentials, query percent-encoded, filter included
    filter: str | None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca: str | None = None
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class Endpoint:
    """A target URL taken apart, before defaults: what the user wrote, decoded."""

    scheme: str
    host: str  # IPv6 literals without brackets
    port: int = DEFAULT_PORT
    path: str = DEFAULT_PATH
    filter: str | None = None  # None: no filter parameter; "": an explicit empty one
    params: tuple[tuple[str, str], ...] = ()  # other query parameters, in order, decoded
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def netloc(self) -> str:
        """host:port, with IPv6 literals in brackets."""
        if ":" in self.host:
            return f"[{quote(self.host, safe=':')}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_target(text: str, *, default_filter: str | None = None) -> Target:
    """Parse one target URL; `default_filter` applies when the URL has no filter parameter."""
    return make_target(split_url(text), default_filter=default_filter)


def make_target(
    endpoint: Endpoint,
    *,
    name: str | None = None,
    default_filter: str | None = None,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
) -> Target:
    """Build the Target for an endpoint; the name defaults to host:port."""
    capture_filter = endpoint.filter if endpoint.filter is not None else default_filter
    # An explicit empty filter means "capture everything": send no filter parameter at all.
    if capture_filter is not None and not capture_filter.strip():
        capture_filter = None
    query = [("filter", capture_filter)] if capture_filter is not None else []
    query += endpoint.params
    url = f"{endpoint.scheme}://{endpoint.netloc}{quote(endpoint.path, safe=_PATH_SAFE)}"
    if query:
        url += "?" + "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in query)
    return Target(
        name=name or endpoint.netloc,
        url=url,
        filter=capture_filter,
        username=endpoint.username,
        password=endpoint.password,
        ca=ca,
        cert=cert,
        key=key,
    )


def split_url(text: str) -> Endpoint:
    """Take a target URL apart and validate it; raises UsageError naming the redacted URL."""
    text = text.strip()
    if not text:
        raise UsageError("empty target URL")
    match = _SCHEME_RE.match(text)
    if match is None or match.group(2) is None:
        raise _missing_scheme(text, match)
    try:
        return _split(validate_scheme(match.group(1)), text[match.end() :])
    except UsageError as error:
        raise UsageError(f"bad target URL {redact(text)}: {error}") from None


def _split(scheme: str, rest: str) -> Endpoint:
    if "#" in rest:
        # Not echoed: what follows "#" may be the tail of a password.
        raise UsageError("a URL fragment ('#...') is not allowed; write a '#' in a password as %23")
    rest, _, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    userinfo, at, hostport = authority.rpartition("@")
    if "@" in path or ("@" in query and not at):
        # Most likely a password with a raw "/" or "?": refuse before a message shows a piece.
        raise UsageError(
            "'@' after the host: write '/', '?' and '#' in a user or password as %2F, %3F and %23"
        )
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user)
        password = unquote(secret) if colon else None
    host, port = split_host_port(hostport)
    filter_, params = _split_query(query)
    return Endpoint(
        scheme=scheme,
        host=host,
        port=DEFAULT_PORT if port is None else port,
        path=validate_path(slash + path),
        filter=filter_,
        params=params,
        username=username,
        password=password,
    )


def _missing_scheme(text: str, match: re.Match[str] | None) -> UsageError:
    if match is not None and match.group(1).lower() in SCHEMES:
        scheme = match.group(1)
        suggestion = redact(f"{scheme}://{text[match.end() :].lstrip('/')}")
        return UsageError(f"'{scheme}:' must be followed by '//': did you mean {suggestion}?")
    suggestion = "http://" + text
    with contextlib.suppress(ValueError):
        suggestion = f"http://[{ipaddress.IPv6Address(text)}]"
    return UsageError(f"target URL without a scheme: did you mean {redact(suggestion)}?")


def split_host_port(hostport: str, scheme: str = "http") -> tuple[str, int | None]:
    """Split "host", "host:port", "[v6]" or "[v6]:port"; the port is None when absent.

    `scheme` names the URL kind in messages (its default port, when it has one of ours).
    """
    default_port = f":{DEFAULT_PORT}" if scheme in SCHEMES else ""
    port_text: str | None = None
    if hostport.startswith("["):
        host, bracket, after = hostport[1:].partition("]")
        if not bracket:
            raise UsageError("missing ']' after the IPv6 address")
        if after:
            if not after.startswith(":"):
                raise UsageError(f"unexpected {after!r} after the IPv6 address")
            port_text = after[1:]
        host = unquote(host)  # RFC 6874: a zone id's "%" is written "%25"
        if ":" not in host:
            raise UsageError(f"[{host}] is not an IPv6 address")
    elif hostport.count(":") > 1:
        raise UsageError(
            f"write an IPv6 address in brackets: {scheme}://[{hostport}]{default_port}"
        )
    else:
        host, colon, port_text_ = hostport.partition(":")
        port_text = port_text_ if colon else None
    host = validate_host(host)
    if port_text is None:
        return host, None
    if not port_text:
        raise UsageError(
            f"empty port: leave out the ':' to use {default_port[1:] or 'the default'}"
        )
    if not port_text.isascii() or not port_text.isdigit():
        raise UsageError(f"bad port {port_text!r}: expected a number from 1 to 65535")
    return host, validate_port(int(port_text))


def _split_query(query: str) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    """Decode the query like Go's url.ParseQuery ('+' is a space), refusing ambiguity."""
    filter_: str | None = None
    params: list[tuple[str, str]] = []
    seen: set[str] = set()
    hint = "(a '&' inside a filter must be written %26)"
    for part in query.split("&") if query else ():
        if not part:
            raise UsageError(f"empty query parameter {hint}")
        raw_key, equals, raw_value = part.partition("=")
        key, value = unquote_plus(raw_key), unquote_plus(raw_value)
        if not equals:
            raise UsageError(f"query parameter {key!r} has no value {hint}")
        if not key:
            raise UsageError(f"query parameter {part!r} has no name")
        if key in seen:
            raise UsageError(f"query parameter {key!r} is given twice")
        seen.add(key)
        if key == "filter":
            filter_ = value
        else:
            params.append((key, value))
    return filter_, tuple(params)


def validate_scheme(scheme: str) -> str:
    """Return the scheme in lower case, or raise UsageError."""
    if scheme.lower() not in SCHEMES:
        raise UsageError(f"unsupported scheme {scheme!r}: use http or https")
    return scheme.lower()


def validate_host(host: str) -> str:
    """Accept a host name, an IPv4 address or an IPv6 address (no brackets)."""
    if not host:
        raise UsageError("missing host")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UsageError(f"bad IPv6 address {host!r}") from None
    elif not _HOSTNAME_RE.fullmatch(host):
        raise UsageError(f"bad host {host!r}: expected a host name or an IP address")
    return host


def validate_port(port: int) -> int:
    if not 1 <= port <= 65535:
        raise UsageError(f"port {port} is out of range: expected a number from 1 to 65535")
    return port


def validate_path(path: str) -> str:
    """An empty path or "/" means the worker's /capture; a trailing slash is dropped
    ("/capture/" is "/capture"), as users often add one and the worker's routes have none."""
    if path.rstrip("/") == "":
        return DEFAULT_PATH
    path = path.rstrip("/") if path.startswith("/") else path
    if not path.startswith("/"):
        raise UsageError(f"path {path!r} must start with '/'")
    if "?" in path or "#" in path:
        raise UsageError(f"path {path!r} cannot hold '?' or '#'")
    return path


def redact(text: str) -> str:
    """Replace the password of every URL in `text`: user:password@ becomes user:***@."""
    return _URL_RE.sub(_redact_url, text)


def _redact_url(match: re.Match[str]) -> str:
    scheme, rest = match.group(1), match.group(2)
    userinfo, at, hostpart = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if not at or not colon:
        return match.group(0)
    return f"{scheme}{user}:***@{hostpart}"


class _Named(Protocol):
    """A target dataclass (a worker's or an SSH one): what naming needs of it."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def name(self) -> str: ...
    @property
    def filter(self) -> str | None: ...


_T = TypeVar("_T", bound=_Named)


def unique_names(targets: Sequence[_T]) -> list[_T]:
    """Make names unique: targets sharing a name but not a filter get the filter appended,
    and remaining duplicates get "#2", "#3", ... ("a", "a" -> "a", "a#2")."""
    filters: dict[str, set[str | None]] = {}
    for target in targets:
        filters.setdefault(target.name, set()).add(target.filter)
    named = [
        replace(t, name=f"{t.name} ({_short(t.filter)})") if len(filters[t.name]) > 1 else t
        for t in targets
    ]
    taken = Counter(t.name for t in named)
    used: set[str] = set()
    result = []
    for target in named:
        name = target.name
        if name in used:
            n = 2
            while f"{name}#{n}" in taken or f"{name}#{n}" in used:
                n += 1
            name = f"{name}#{n}"
            target = replace(target, name=name)
        used.add(name)
        result.append(target)
    return result


def _short(capture_filter: str | None) -> str:
    if capture_filter is None:
        return "no filter"
    capture_filter = " ".join(capture_filter.split())  # one line, whatever it holds
    if len(capture_filter) > _NAME_FILTER_MAX:
        return capture_filter[: _NAME_FILTER_MAX - 1] + "…"
    return capture_filter
