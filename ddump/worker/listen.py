"""Where the worker listens, who may connect, and what that exposes.

Whoever reaches the worker reads every packet of its host: it has no TLS and no
authentication. So by default it listens on loopback only (127.0.0.1 and ::1), where a local
client or a reverse proxy on the same host reaches it; any other address has to be asked for,
and is then warned about at start and shown by /health. `--allow CIDR` narrows who may connect
when a proxy on another host must reach it.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import stat
from collections.abc import Sequence
from dataclasses import dataclass

from tornado.netutil import bind_sockets, bind_unix_socket

from ddump.errors import UsageError
from ddump.protocol import DEFAULT_PORT

log = logging.getLogger("ddump.worker")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_LISTEN_TEXT = f"127.0.0.1:{DEFAULT_PORT} and [::1]:{DEFAULT_PORT}"
NGINX_SECTION = 'README.md, "Deploying behind nginx (TLS, client certificates, Basic Auth)"'


@dataclass(frozen=True)
class TcpListen:
    host: str | None  # None: every address, IPv4 and IPv6
    port: int


@dataclass(frozen=True)
class UnixListen:
    path: str


# Loopback, both families: what a worker started without --listen serves.
DEFAULT_LISTEN = (TcpListen("127.0.0.1", DEFAULT_PORT), TcpListen("::1", DEFAULT_PORT))


def parse_listen(text: str) -> TcpListen | UnixListen:
    """`[host]:port` (IPv6 in brackets), a bare port, or `unix:/path`."""
    if text.startswith("unix:"):
        path = text.removeprefix("unix:")
        if not path:
            raise UsageError("--listen unix: needs a path, e.g. unix:/run/ddump/worker.sock")
        return UnixListen(path)
    host: str | None
    if text.isdigit():
        host, port_text = None, text
    elif text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise UsageError(f"--listen {text!r}: write an IPv6 address as [::1]:{DEFAULT_PORT}")
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise UsageError(
                f"--listen {text!r}: expected [host]:port, e.g. :{DEFAULT_PORT}, "
                f"127.0.0.1:{DEFAULT_PORT}, [::1]:{DEFAULT_PORT} or unix:/path"
            )
        if ":" in host:
            raise UsageError(f"--listen {text!r}: write an IPv6 address as [{host}]:{port_text}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"--listen {text!r}: port must be a number from 0 to 65535")
    return TcpListen(host or None, int(port_text))


def listen_addresses(text: str | None) -> tuple[TcpListen | UnixListen, ...]:
    """What to bind: `--listen`'s one address, or loopback in both families without it."""
    return DEFAULT_LISTEN if text is None else (parse_listen(text),)


def parse_network(text: str) -> Network:
    """An `--allow` value: a network in CIDR notation, or one address."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise UsageError(
            f"--allow {text!r}: expected an address or a network, e.g. 198.51.100.7, "
            "10.0.0.0/8 or 2001:db8::/32"
        ) from None


def client_allowed(address: str, networks: Sequence[Network]) -> bool:
    """True when `address` (a peer's IP, as the socket gives it) is in one of `networks`."""
    try:
        parsed = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped  # an IPv4 client of a dual-stack [::] socket
    return any(parsed in network for network in networks)


def socket_name(sock: socket.socket) -> str:
    """`127.0.0.1:8475`, `[::1]:8475` or `unix:/path`."""
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def exposed(sockets: Sequence[socket.socket]) -> list[str]:
    """The listening TCP sockets that other hosts may reach: any address but loopback."""
    names = []
    for sock in sockets:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            continue  # a unix socket: file permissions decide
        address = ipaddress.ip_address(sock.getsockname()[0].split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if not address.is_loopback:
            names.append(socket_name(sock))
    return names


def exposure_warning(names: Sequence[str], allow: Sequence[Network]) -> str:
    """What the start-up warning says when the worker listens beyond loopback."""
    who = (
        "any host in --allow " + " ".join(str(network) for network in allow)
        if allow
        else "any host that can reach it there"
    )
    return (
        f"exposed beyond this host on {' '.join(names)} (not loopback): {who} can read "
        "every packet this host sends or receives (the worker has no TLS and no "
        "authentication). "
        f"Put nginx in front of it (see {NGINX_SECTION}) and listen on 127.0.0.1 or a unix: "
        "socket; to keep it reachable from a proxy on another host, give --allow that host"
    )


def bind(
    listens: Sequence[TcpListen | UnixListen], socket_mode: int
) -> tuple[list[socket.socket], str]:
    """Listening sockets and how to name them; raise UsageError when an address is taken."""
    sockets: list[socket.socket] = []
    try:
        for listen in listens:
            # Without --listen, [::1] is a bonus: a host may have IPv6 off.
            optional = listens == DEFAULT_LISTEN and listen == DEFAULT_LISTEN[1]
            sockets += _bind_one(listen, socket_mode, optional)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets, " ".join(socket_name(sock) for sock in sockets)


def _bind_one(
    listen: TcpListen | UnixListen, socket_mode: int, optional: bool
) -> list[socket.socket]:
    if isinstance(listen, UnixListen):
        _refuse_live_socket(listen.path)
        try:
            return [bind_unix_socket(listen.path, mode=socket_mode)]
        except (OSError, ValueError) as error:
            raise UsageError(f"cannot listen on unix:{listen.path}: {error}") from None
    try:
        return bind_sockets(listen.port, address=listen.host)
    except OSError as error:
        if optional and error.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            # IPv6 is off on this host: 127.0.0.1 alone serves local clients.
            # (Not "listening on": that phrase starts the line that names the addresses.)
            log.info("[::1]:%d left out: %s", listen.port, error.strerror or error)
            return []
        host = f"[{listen.host}]" if listen.host and ":" in listen.host else listen.host or ""
        raise UsageError(
            f"cannot listen on {host}:{listen.port}: {error.strerror or error}"
        ) from None


def _refuse_live_socket(path: str) -> None:
    """A socket file nobody answers on is stale and gets replaced; a live one is an error."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return  # bind_unix_socket refuses to remove anything but a socket
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as error:
        if error.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return
        raise UsageError(f"cannot check unix:{path}: {error}") from None
    finally:
        probe.close()
    raise UsageError(f"unix:{path} is in use by another process; stop it or pick another path")
