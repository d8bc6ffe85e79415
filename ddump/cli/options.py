"""The command line, declared in one place."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ddump import __version__
from ddump.cli.compress import check_available, without_compression
from ddump.cli.rotation import Rotation, check, parse_size
from ddump.errors import UsageError
from ddump.pcap import DEFAULT_SNAPLEN
from ddump.records import ENGINE

# Spellings users of the earlier ddump type; argparse would read `-ca` as `-c a`.
SINGLE_DASH_ALIASES = {"-ca": "--ca", "-cert": "--cert", "-key": "--key"}

DESCRIPTION = """\
Capture on many hosts at once and write one merged pcap, in timestamp order, to stdout.

Each TARGET is a ddump-worker URL:
  http[s]://[USER[:PASSWORD]@]HOST[:PORT][/capture][?filter=BPF]
A URL with a USER but no PASSWORD takes the password from $DDUMP_PASSWORD, which keeps it
out of the process list (unset or empty is an error; USER:@ means no password). PORT
defaults to 8475 (for https too), the path to /capture; percent-encode the filter (e.g.
?filter=tcp%20port%2080), and an IPv6 zone as %25 (http://[fe80::1%25eth0]). Targets can
also come from an inventory (-f fleet.yaml).
A TARGET may also be a host reached over SSH, where only tcpdump is needed (no worker):
  ssh://[USER@]HOST[:PORT][?filter=BPF&snaplen=N&count=N&duration=S&batch=1&sudo=1]
It runs your ssh client (your ~/.ssh/config, agent and known_hosts; never a prompt, never a
password in the URL); sudo=1 (or --sudo) runs tcpdump with `sudo -n`.
A TARGET may also be a capture file (a path, file:///path, or - for stdin): pcap, pcapng,
or either gzip-compressed. Files are merged exactly, like mergecap (each is read when the
merge needs it); stdin and FIFOs like live targets. Only pcap goes to stdout (or pcapng with
--format pcapng); messages go to stderr.

Each setting of a target comes from, in this order: the target's own (its URL, its inventory
keys), then the command line (--filter, -s, --batch), then the inventory's defaults. A target
given twice (same URL, filter and parameters) is captured once.
"""

EPILOG = """\
examples:
  ddump http://web-1 http://web-2 | tcpdump -nl -r -
  ddump -f fleet.yaml --group web --filter 'tcp port 443' -w web.pcap
  ddump --ca ca.pem --cert me.pem --key me.key 'https://ops@db-1:443/capture?filter=icmp'
  ddump web-1.pcap web-2.pcap -w merged.pcap
  ddump ssh://web-1 'ssh://ops@db-1:2222?filter=tcp%20port%205432&sudo=1' | tcpdump -nl -r -
  ddump -f fleet.yaml -w 'fleet-%Y%m%d-%H%M%S.pcap' -G 600     # a new file every 10 min
  ddump -f fleet.yaml -w fleet.pcapng -C 100 -W 20              # a ring of 20 x 100 MB
  ddump -f fleet.yaml -w fleet.pcap.gz                          # gzip, flushed every second
  ddump-extcap --install    # then "ddump" is a capture interface of Wireshark and tshark

exit status:
  0  the capture is whole: every stream ended as asked (its count or duration), or the
     capture was stopped (Ctrl-C, -c, --duration, closed output) while all were capturing
  1  the capture is partial: a target failed, never answered, or was not captured for a
     while (a gap, even one --reconnect closed; the summary gives its times), or the
     output failed
  2  bad usage: options, URLs, inventory or TLS files; nothing was started
  130  a Ctrl-C after the stop had begun (0.5 s or more after the one that began it)
       ended ddump at once (with batch targets: after the wait for their last blocks; a
       Ctrl-C during that wait ends it cleanly)
"""


@dataclass(frozen=True)
class Options:
    """The parsed command line."""

    urls: tuple[str, ...]
    inventories: tuple[str, ...]
    groups: tuple[str, ...]
    filter: str | None
    snaplen: int | None
    batch: bool
    sudo: bool
    write: str
    format: str  # pcap | pcapng
    rotation: Rotation  # -w with -C, -G, -W, -z
    count: int | None
    duration_ns: int | None
    max_delay_ns: int
    connect_timeout_s: float
    reconnect: bool
    ca: str | None
    cert: str | None
    key: str | None
    quiet: bool
    verbose: bool
    traceback: bool


def parse_seconds(text: str) -> int:
    """'0.25', '250ms', '2s', '1m' -> integer nanoseconds (no float rounding)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ns|us|ms|s|m)?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 0.5, 250ms, 2s, 1m)")
    # Exact in integers ("0.25" s = 25 * 10**9 // 10**2 ns), not Decimal: its import costs
    # ~1 ms at every start, for the two defaults below.
    whole, _, fraction = match.group(1).partition(".")
    scale = {"ns": 1, "us": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9}
    places: int = 10 ** len(fraction)
    return int(whole + fraction) * scale[match.group(2) or "s"] // places


def _positive_seconds(text: str) -> int:
    value = parse_seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than zero: {text!r}")
    return value


def _snaplen(text: str) -> int:
    value = _positive_int(text)
    if value > DEFAULT_SNAPLEN:
        raise argparse.ArgumentTypeError(f"at most {DEFAULT_SNAPLEN} (a whole packet)")
    return value


def _file_size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _whole_seconds(text: str) -> int:
    return _positive_int(text) * 10**9


_NOT_WRITTEN = (".zstd", ".xz", ".bz2", ".lz4")  # read by tshark, but not written here


def _output_name(text: str) -> str:
    if text.lower().endswith(_NOT_WRITTEN):
        raise argparse.ArgumentTypeError(
            f"{text}: ddump compresses only to gzip (.gz) and zstd (.zst): name the file so, "
            "or compress each finished file with -z"
        )
    return text


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1: {text!r}")
    return int(text)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see ddump --help)")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    # argparse makes a formatter for every add_argument, and its default width comes from
    # shutil, whose import (bz2, lzma, zlib) costs ~2 ms at every start for help rarely shown.
    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_terminal_columns() - 2)


def _terminal_columns() -> int:
    """What shutil.get_terminal_size() would say: $COLUMNS, else the terminal's, else 80."""
    with contextlib.suppress(ValueError):
        if (columns := int(os.environ.get("COLUMNS", "0"))) > 0:
            return columns
    try:
        return os.get_terminal_size().columns or 80
    except (ValueError, OSError):
        return 80


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ddump",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "urls", nargs="*", metavar="TARGET", help="worker URL or capture file (see above)"
    )

    targets = parser.add_argument_group("targets")
    targets.add_argument(
        "-f",
        "--inventory",
        action="append",
        default=[],
        metavar="FLEET.yaml",
        help="read targets from a YAML inventory (repeatable; see configs/fleet.yaml)",
    )
    targets.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="NAME",
        help="only the inventory's targets in group NAME (repeatable, or NAME,NAME)",
    )
    targets.add_argument(
        "--filter",
        metavar="BPF",
        help="capture filter for targets that do not give one (it beats the inventory's defaults)",
    )
    targets.add_argument(
        "-s",
        "--snaplen",
        type=_snaplen,
        metavar="SNAPLEN",
        help="keep at most SNAPLEN bytes of each packet, for worker targets that do not give "
        f"?snaplen= (1..{DEFAULT_SNAPLEN}; default: whole packets, up to 262,000 bytes). On busy "
        "hosts a small "
        "one (e.g. -s 200 for headers) also lets many more packets fit tcpdump's buffer, so "
        "fewer are dropped",
    )
    targets.add_argument(
        "--batch",
        action="store_true",
        help="for busy hosts: worker targets that do not give ?batch= run tcpdump without "
        "--immediate-mode, so the kernel hands packets over in blocks. tcpdump then needs "
        "several times less CPU per packet and its buffer holds packets densely (far fewer "
        "drops), but a packet may reach the output about 1 s later: the merge waits that "
        "much longer for those targets, and so does a stop (a second Ctrl-C stops at once)",
    )
    targets.add_argument(
        "--sudo",
        action="store_true",
        help="ssh:// targets that do not give ?sudo= run tcpdump with `sudo -n` (never a "
        "password prompt: the remote sudoers must allow tcpdump without one)",
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "-w",
        dest="write",
        type=_output_name,
        default="-",
        metavar="FILE",
        help="write the pcap to FILE (- = stdout); a name ending in .gz is written as gzip "
        "(.zst: zstd, with the zstandard module), readable up to the last second if ddump is "
        "killed (see -C/-G for rotated files)",
    )
    output.add_argument(
        "--format",
        choices=("pcap", "pcapng"),
        help="pcap (default; read by everything) or pcapng, which names each packet's host "
        "and interface (host:eth0) for Wireshark/tshark; -w FILE.pcapng chooses pcapng",
    )
    output.add_argument(
        "-c", dest="count", type=_positive_int, metavar="COUNT", help="stop after COUNT packets"
    )
    output.add_argument(
        "--duration",
        type=_positive_seconds,
        metavar="SECONDS",
        help="stop after this long (e.g. 30, 90s, 5m)",
    )
    output.add_argument(
        "--max-delay",
        type=_positive_seconds,
        default=parse_seconds("250ms"),
        metavar="SECONDS",
        help="longest time a quiet target may hold back the others' packets; packets that "
        "arrive later than this are still written, out of place, and counted as late. "
        "Packets already here that ddump has yet to read (ddump short of CPU) are not late: "
        "they hold the others back until read (default 250ms)",
    )

    files = parser.add_argument_group(
        "rotated files (as tcpdump's; each a whole capture, and in order the whole merge)"
    )
    files.add_argument(
        "-C",
        dest="file_size",
        type=_file_size,
        metavar="SIZE",
        help="start a new file when the current one is larger than SIZE millions of bytes "
        "(before compression; e.g. 100, 0.5); the next files are named FILE1, FILE2, ...",
    )
    files.add_argument(
        "-G",
        dest="rotate_seconds",
        type=_whole_seconds,
        metavar="SECONDS",
        help="start a new file every SECONDS, named by strftime from -w "
        "(e.g. -w 'fleet-%%Y%%m%%d-%%H%%M%%S.pcap', local time)",
    )
    files.add_argument(
        "-W",
        dest="file_count",
        type=_positive_int,
        metavar="N",
        help="with -C: a ring of N files (FILE00..FILE19 for 20), the oldest replaced first; "
        "with -G: stop after N files",
    )
    files.add_argument(
        "-z",
        dest="postrotate",
        metavar="COMMAND",
        help="run COMMAND FILE on each finished file, without a shell (e.g. -z gzip; a "
        "program, no arguments: use a script for more); a failure is reported, not fatal",
    )

    connection = parser.add_argument_group("connection")
    connection.add_argument(
        "--connect-timeout",
        type=_positive_seconds,
        default=parse_seconds("10s"),
        metavar="SECONDS",
        help="give up on a target that does not connect within this (default 10s)",
    )
    connection.add_argument(
        "--reconnect",
        action="store_true",
        help="retry a target that fails: 0.25 s after a running capture was lost, then every "
        "0.5 s for 15 s; else with backoff (1 s doubling to 30 s). A target that ends as "
        "asked (its count or duration) is not retried; each gap is in the summary",
    )

    tls = parser.add_argument_group(
        "TLS (verification is always on; default trust roots: SSL_CERT_FILE/SSL_CERT_DIR, "
        "else the system store, else certifi)"
    )
    tls.add_argument("--ca", metavar="FILE", help="trust only these CA certificates (PEM)")
    tls.add_argument("--cert", metavar="FILE", help="client certificate chain for mutual TLS (PEM)")
    tls.add_argument("--key", metavar="FILE", help="private key of --cert (PEM)")

    messages = parser.add_argument_group("messages (all on stderr)")
    messages.add_argument("-q", "--quiet", action="store_true", help="only errors")
    messages.add_argument("-v", "--verbose", action="store_true", help="more detail")
    messages.add_argument(
        "--traceback", action="store_true", help="show the traceback of unexpected errors"
    )
    messages.add_argument(
        "--version",
        action="version",
        version=f"ddump {__version__} (merge engine: {'C' if ENGINE == 'c' else 'pure Python'})",
        help="show the version and the merge engine (C or pure Python), and exit",
    )
    return parser


def parse_args(argv: Sequence[str]) -> Options:
    """Parse argv (without the program name)."""
    argv = [SINGLE_DASH_ALIASES.get(arg, arg) for arg in argv]
    ns = build_parser().parse_args(argv)
    if not ns.urls and not ns.inventory:
        raise UsageError("no targets: give worker URLs or -f FLEET.yaml (see ddump --help)")
    groups = tuple(g.strip() for arg in ns.group for g in arg.split(",") if g.strip())
    if groups and not ns.inventory:
        raise UsageError("--group selects inventory groups: it needs -f FLEET.yaml")
    rotation = Rotation(
        ns.write, ns.file_size, ns.rotate_seconds, ns.file_count, _program(ns.postrotate)
    )
    check(rotation)
    check_available(ns.write)
    plain_name = without_compression(ns.write).lower()
    return Options(
        urls=tuple(ns.urls),
        inventories=tuple(ns.inventory),
        groups=groups,
        filter=ns.filter,
        snaplen=ns.snaplen,
        batch=ns.batch,
        sudo=ns.sudo,
        write=ns.write,
        format=ns.format or ("pcapng" if plain_name.endswith(".pcapng") else "pcap"),
        rotation=rotation,
        count=ns.count,
        duration_ns=ns.duration,
        max_delay_ns=ns.max_delay,
        connect_timeout_s=ns.connect_timeout / 1e9,
        reconnect=ns.reconnect,
        ca=ns.ca,
        cert=ns.cert,
        key=ns.key,
        quiet=ns.quiet,
        verbose=ns.verbose,
        traceback=ns.traceback,
    )


def _program(command: str | None) -> str | None:
    """-z's program, found now: a typo or `-z 'gzip -9'` is a usage error, not N warnings."""
    if command is None:
        return None
    import shutil  # only with -z (its import costs ~2 ms, see _HelpFormatter)

    if shutil.which(command) is None:
        hint = " (a program without arguments, as tcpdump takes it)" if " " in command else ""
        raise UsageError(f"-z {command}: no such program{hint}")
    return command
