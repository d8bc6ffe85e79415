"""ddump-worker: command line, listening sockets, signals, and a clean stop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence

import ddump
from ddump.errors import UsageError
from ddump.pcap import LINKTYPE_LINUX_SLL2, PcapHeader
from ddump.protocol import DEFAULT_PORT
from ddump.worker.app import make_app
from ddump.worker.capture import pipe_size_for
from ddump.worker.filter import (
    DEFAULT_BUFFER_KIB,
    MAX_FILTER_LEN,
    FilterError,
    check_filter,
    self_exclusion,
)
from ddump.worker.health import capture_check
from ddump.worker.listen import (
    DEFAULT_LISTEN_TEXT,
    Network,
    UnixListen,
    bind,
    exposed,
    exposure_warning,
    listen_addresses,
    parse_network,
)
from ddump.worker.params import NS_PER_S
from ddump.worker.refusals import RefusalLog
from ddump.worker.registry import CaptureRegistry
from ddump.worker.server import BoundedHTTPServer, default_max_connections
from ddump.worker.spawn import unprivileged_user
from ddump.worker.start import missing_tcpdump_message
from ddump.worker.state import WorkerState
from ddump.worker.tcpdump import error_lines

log = logging.getLogger("ddump.worker")

DEFAULT_MAX_CAPTURES = 16
DEFAULT_SOCKET_MODE = 0o660
# After SIGTERM: time for captures to end their responses, then for connections to close.
DRAIN_NS = 5 * NS_PER_S
CLOSE_NS = 2 * NS_PER_S
TELL_NS = 2 * NS_PER_S  # for clients of direct captures to ask how theirs ended
MAX_BODY = 4096  # bytes of request body accepted (none is used)
BODY_TIMEOUT_S = 10.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddump-worker",
        description="Stream live tcpdump captures over HTTP: GET /capture?filter=BPF "
        "answers a chunked pcap (application/vnd.tcpdump.pcap); GET /capture/stats?id=NAME "
        "tcpdump's counts (drops) for the capture whose X-Ddump-Capture header is NAME; "
        "GET /health answers 200, or 503 with the reason when no capture can start.",
        epilog="Needs CAP_NET_RAW, not root: e.g. systemd AmbientCapabilities=CAP_NET_RAW, "
        "or setpriv --reuid=USER --regid=GROUP --clear-groups --inh-caps=+net_raw "
        "--ambient-caps=+net_raw ddump-worker. Stops cleanly on SIGTERM or SIGINT.",
    )
    parser.add_argument(
        "--listen",
        "-listen",
        metavar="ADDR",
        help=f"[host]:port (IPv6 as [::1]:{DEFAULT_PORT}; port 0 picks a free one; "
        f":{DEFAULT_PORT} is every address) or unix:/path. Default {DEFAULT_LISTEN_TEXT}: "
        "this host only, because whoever reaches the worker reads every packet of the host "
        "(no TLS, no authentication): serve other hosts through a reverse proxy with TLS and "
        "authentication (nginx, see the README). Listening on any other address is warned "
        "about at start and shown by GET /health (exposed). Traffic on the listening TCP port "
        "is never captured (only on the bound addresses, if given).",
    )
    parser.add_argument(
        "--allow",
        metavar="CIDR",
        action="append",
        default=[],
        type=_network,
        help="accept connections only from this network or address (e.g. the reverse "
        "proxy's, 198.51.100.7 or 10.1.0.0/16); connections from elsewhere are closed at once "
        "and logged. Repeatable; loopback is not implied (add 127.0.0.1 for local checks). "
        "Default: anyone who reaches the listening address",
    )
    parser.add_argument(
        "--exclude",
        metavar="BPF",
        action="append",
        default=[],
        help="never capture traffic that matches BPF, whatever the client's filter; "
        "repeatable (e.g. a reverse proxy in front: --exclude 'tcp port 443')",
    )
    parser.add_argument(
        "--max-captures",
        metavar="N",
        type=_positive_int,
        default=DEFAULT_MAX_CAPTURES,
        help=f"captures running at once; more get 503 with Retry-After "
        f"(default {DEFAULT_MAX_CAPTURES})",
    )
    parser.add_argument(
        "--no-shared-captures",
        dest="share",
        action="store_false",
        help="run a tcpdump for every capture; by default a live capture identical to a running "
        "one (same filter and options, no packet count, not batch=1) joins its tcpdump, which "
        "then serves both clients at the pace of the slower one",
    )
    parser.add_argument(
        "--max-connections",
        metavar="N",
        type=_positive_int,
        help="open connections at most (idle ones included); more are closed at once, so a "
        "flood of connections cannot use up the worker's file descriptors (default: 1000, "
        "or fewer if the descriptor limit, ulimit -n, leaves less room)",
    )
    parser.add_argument(
        "--buffer-size",
        metavar="KiB",
        type=_positive_int,
        default=DEFAULT_BUFFER_KIB,
        help="kernel capture buffer of each capture, in KiB (tcpdump -B; default "
        f"{DEFAULT_BUFFER_KIB}). In immediate mode (the default) every packet takes a slot of "
        "the snapshot length, so at the default snaplen (262000) this holds about 128 packets: "
        "the burst a capture absorbs while "
        "tcpdump or its client is slow before the kernel drops. Clients asking for a small "
        "snaplen get more slots; a ?batch=1 capture packs packets densely. Up to "
        "--max-captures of these are allocated at once.",
    )
    parser.add_argument(
        "--tcpdump", metavar="PATH", default="tcpdump", help="tcpdump binary (default: on PATH)"
    )
    parser.add_argument(
        "--socket-mode",
        metavar="MODE",
        type=_octal_mode,
        default=DEFAULT_SOCKET_MODE,
        help="file mode of a unix: socket, in octal (default 0660: the worker's user and "
        "group, e.g. run it with nginx's group). A stale socket file is replaced at start, "
        "and the socket is removed at exit.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {ddump.__version__}")
    return parser


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _network(text: str) -> Network:
    try:
        return parse_network(text)
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix(f"--allow {text!r}: ")) from None


def _octal_mode(text: str) -> int:
    if not text or any(char not in "01234567" for char in text) or int(text, 8) > 0o777:
        raise argparse.ArgumentTypeError(f"expected an octal mode like 0660, got {text!r}")
    return int(text, 8)


def _check_exclusions(expressions: Sequence[str]) -> list[str]:
    checked = []
    for expression in expressions:
        try:
            text = check_filter(expression)
        except FilterError as error:
            raise UsageError(f"--exclude {expression!r}: {error}") from None
        if text is None:
            raise UsageError("--exclude needs a BPF expression, got an empty one")
        checked.append(text)
    return checked


_READING_NOISE = ("reading from file", "Warning: interface names")


def _compile_exclusions(tcpdump: str, expressions: Sequence[str]) -> None:
    """Have tcpdump compile each --exclude now (against an empty LINUX_SLL2 pcap on its stdin,
    which needs no privilege), so a typo stops the worker instead of failing every capture."""
    empty = PcapHeader(linktype=LINKTYPE_LINUX_SLL2).to_bytes()
    for expression in expressions:
        try:
            done = subprocess.run(
                [tcpdump, "-d", "-r", "-", "--", expression],
                input=empty,
                capture_output=True,
                timeout=10,
            )
        except (OSError, subprocess.SubprocessError) as error:
            log.warning("could not check --exclude %r with %s: %s", expression, tcpdump, error)
            return
        if done.returncode != 0:
            said = error_lines(done.stderr.decode("utf-8", "replace")).splitlines()
            said = [line for line in said if not line.startswith(_READING_NOISE)]
            message = "; ".join(said) or f"exit status {done.returncode}"
            raise UsageError(f"--exclude {expression!r}: tcpdump cannot compile it: {message}")


def _self_exclusions(sockets: Sequence[socket.socket]) -> list[str]:
    tcp = [sock for sock in sockets if sock.family in (socket.AF_INET, socket.AF_INET6)]
    if not tcp:
        return []  # a unix socket's traffic is not on any interface
    port = tcp[0].getsockname()[1]
    return [self_exclusion(port, [sock.getsockname()[0] for sock in tcp])]


async def serve(args: argparse.Namespace) -> int:
    """Run the worker until SIGTERM or SIGINT; then end every capture and return 0."""
    listens = listen_addresses(args.listen)
    unix_path = next((listen.path for listen in listens if isinstance(listen, UnixListen)), None)
    if unix_path is not None and args.allow:
        raise UsageError(
            "--allow applies to TCP clients: on a unix: socket, its file mode (--socket-mode) "
            "and group decide who may connect"
        )
    exclusions = _check_exclusions(args.exclude)
    _compile_exclusions(args.tcpdump, exclusions)
    if os.geteuid() == 0:
        log.warning(
            "running as root: this works, but ddump-worker needs only CAP_NET_RAW; run it as "
            "an unprivileged user with AmbientCapabilities=CAP_NET_RAW"
        )
    if shutil.which(args.tcpdump) is None:
        log.warning("%s; captures will get 503 until then", missing_tcpdump_message(args.tcpdump))
    sockets, where = bind(listens, args.socket_mode)
    unix_inode = os.stat(unix_path).st_ino if unix_path else None
    refusals = RefusalLog()
    state = WorkerState(
        tcpdump=args.tcpdump,
        exclusions=tuple(_self_exclusions(sockets) + exclusions),
        captures=CaptureRegistry(args.max_captures),
        drop_to=unprivileged_user() if os.geteuid() == 0 else None,
        buffer_kib=args.buffer_size,
        pipe_size=pipe_size_for(args.max_captures),
        unix_socket=unix_path is not None,
        share=args.share,
        exposed=tuple(exposed(sockets)),
        allow=tuple(str(network) for network in args.allow),
        refusals=refusals,
    )
    # Room for the longest filter we accept, fully percent-encoded: a longer request line would
    # be cut by Tornado with a reset instead of our 400 that names the limit.
    # No endpoint takes a body: a request that sends one is refused, not buffered.
    max_connections = args.max_connections or default_max_connections(args.max_captures)
    server = BoundedHTTPServer(
        make_app(state),
        max_header_size=3 * MAX_FILTER_LEN + 8192,
        idle_connection_timeout=60,
        max_body_size=MAX_BODY,
        body_timeout=BODY_TIMEOUT_S,
    )
    server.max_connections = max_connections
    server.allow = tuple(args.allow)
    server.refusals = refusals
    # Before serving: the check's own short-lived tcpdump is never running beside a capture,
    # and a worker that cannot capture says so before it says it listens.
    await _check_capture(state)
    server.add_sockets(sockets)
    log.info(
        "listening on %s (pid %d); never capturing: %s; at most %d captures, %d connections%s",
        where,
        os.getpid(),
        " and ".join(f"({e})" for e in state.exclusions) or "-",
        args.max_captures,
        max_connections,
        "; clients from " + " ".join(state.allow) + " only" if state.allow else "",
    )
    if state.exposed:
        log.warning("%s", exposure_warning(state.exposed, args.allow))
    signals = asyncio.Queue[int]()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, signals.put_nowait, signum)
    try:
        received = await signals.get()
        log.info("%s: stopping %d capture(s)", signal.Signals(received).name, len(state.captures))
        # Still listening, to refuse new captures and answer how the stopped ones ended.
        state.captures.stop_all("worker stopping")
        drained = asyncio.ensure_future(state.captures.wait_idle(DRAIN_NS))
        again = asyncio.ensure_future(signals.get())
        await asyncio.wait((drained, again), return_when=asyncio.FIRST_COMPLETED)
        again.cancel()
        if not drained.done() or not drained.result():
            # A client that does not read keeps its response from ending: cut it.
            drained.cancel()
            state.captures.abort_all("worker stopping now")
        await state.captures.wait_told(TELL_NS)
        server.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.close_all_connections(), CLOSE_NS / NS_PER_S)
        await state.captures.wait_idle(CLOSE_NS)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        if unix_path is not None:
            _remove_socket(unix_path, unix_inode)
    log.info("stopped")
    return 0


async def _check_capture(state: WorkerState) -> None:
    """Say at start, not at the first capture, when this worker cannot capture at all."""
    reason = await capture_check(state)
    if reason is not None:
        log.warning(
            "cannot capture: %s; GET /health answers 503 until this is fixed",
            "; ".join(line.strip() for line in reason.splitlines()),
        )


def _remove_socket(path: str, inode: int | None) -> None:
    # Only our own socket: another worker may have replaced it since.
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == inode:
            os.unlink(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `ddump-worker`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s ddump-worker %(levelname)s: %(message)s",
    )
    try:
        return asyncio.run(serve(args))
    except UsageError as error:
        print(f"ddump-worker: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
