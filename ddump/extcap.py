"""`ddump-extcap`: ddump as a Wireshark/tshark capture interface (extcap, see extcap(4)).

Wireshark runs this program, found in an extcap folder, in phases: --extcap-interfaces,
--extcap-dlts, --extcap-config (again with --extcap-reload-option for the group list), a
--extcap-capture-filter check while the user types one, and at last --capture --fifo PATH with
the options of its dialog. The capture is an ordinary ddump session whose pcapng goes into the
FIFO, each (target, interface) a pcapng interface named as with `ddump --format pcapng`.

A program of its own rather than `ddump --extcap-...`: Wireshark's arguments never meet ddump's
command line (its --filter, its TARGETs), and the Wireshark-facing help stays separate.

Wireshark shows whatever an extcap writes to stderr as an error, so a capture writes nothing
there unless something failed. The FIFO is opened before anything can fail, the parsing of the
command line included: tshark 4.0 waits for ever on a FIFO that its extcap never opened.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from ddump.cli.report import Reporter
from ddump.errors import DdumpError, UsageError
from ddump.extcap_config import (
    ALL_GROUPS,
    INTERFACE,
    OPTIONS,
    config_sentences,
    dlts_sentences,
    group_value_sentences,
    interfaces_sentences,
    option_named,
)
from ddump.targets import redact

PROG = "ddump-extcap"

DESCRIPTION = f"""\
ddump as a capture interface of Wireshark and tshark ("{INTERFACE}" in their interface lists).

Install it once in your personal extcap folder (Wireshark 4.0/4.1: ~/.config/wireshark/extcap,
4.2 and later: ~/.local/lib/wireshark/extcap; the Debian package installs it for everyone):
  {PROG} --install
Then choose "{INTERFACE}" in Wireshark, fill in an inventory (and group) or target URLs in its
options (the gear icon), and start; or with tshark:
  tshark -i {INTERFACE} -o 'extcap.{INTERFACE}.targets:http://web-1 http://web-2' -f 'tcp port 443'
Each packet's interface (the Interface column, frame.interface_name) is TARGET:IFACE, e.g.
web-1:8475:eth0, as with ddump --format pcapng.
Passwords never go into the options: they come from the inventory's password_env or
password_file, or from DDUMP_PASSWORD in Wireshark's environment.
"""

EPILOG = f"""\
exit status: 0 captured until stopped; 1 a target or the output failed (the message names the
target); 2 bad options, inventory or URL. --install prints where it put the extcap.
The options' preference names are extcap.{INTERFACE}.NAME (tshark -o), NAME being the option
without dashes: {", ".join("extcap." + INTERFACE + "." + o.name.replace("-", "") for o in OPTIONS)}.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--install",
        action="store_true",
        help="install into your personal Wireshark extcap folder and say where",
    )
    proto = parser.add_argument_group("extcap protocol (Wireshark and tshark call these)")
    proto.add_argument("--extcap-interfaces", action="store_true", help="list the interface")
    proto.add_argument("--extcap-version", metavar="VERSION", help="the calling Wireshark's")
    proto.add_argument("--extcap-interface", metavar="NAME", help=f"the interface: {INTERFACE}")
    proto.add_argument("--extcap-dlts", action="store_true", help="list its link types")
    proto.add_argument("--extcap-config", action="store_true", help="list its options")
    proto.add_argument(
        "--extcap-reload-option", metavar="OPTION", help="list the values of OPTION again"
    )
    proto.add_argument("--capture", action="store_true", help="capture into --fifo")
    proto.add_argument("--fifo", metavar="PATH", help="where the pcapng goes")
    proto.add_argument(
        "--extcap-capture-filter",
        metavar="BPF",
        help="Wireshark's capture filter field: the filter for targets that give none",
    )
    for control in ("--extcap-control-in", "--extcap-control-out"):
        proto.add_argument(control, help=argparse.SUPPRESS)  # no toolbar: ignored

    dialog = parser.add_argument_group("capture options (Wireshark's dialog for ddump)")
    for option in OPTIONS:
        if option.type == "boolflag":
            dialog.add_argument(option.call, action="store_true", help=option.tooltip)
        else:
            dialog.add_argument(
                option.call, metavar=option.name.upper().replace("-", "_"), help=option.tooltip
            )
    return parser


class ExtcapReporter(Reporter):
    """Errors at once; warnings only if something failed (Wireshark shows stderr as an error)."""

    stamp_events = False  # a dialog shows one message: the time of day is noise there

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream, quiet=True, verbose=False)
        self.held: list[str] = []

    def warn(self, text: str) -> None:
        self.held.append(text)

    def release_warnings(self) -> None:
        for text in self.held:
            self.error(f"warning: {text}")
        self.held.clear()


def inventory_groups(path: str | None) -> tuple[list[tuple[str, int]], str]:
    """The inventory's groups with their target counts, and what "all targets" stands for.

    An inventory that ddump would refuse still lists the groups it names, and the first value
    says why it would be refused: the dialog is where the user sees it first.
    """
    if not path:
        return [], "all targets (choose an inventory, then read its groups)"
    import yaml

    from ddump.inventory import load_inventory

    data, note = None, "inventory not read: it is empty"
    try:
        with open(path, "rb") as file:
            data = yaml.safe_load(file)
    except (OSError, yaml.YAMLError) as exc:
        data, note = None, f"inventory not read: {exc}"
    raw = data.get("groups") if isinstance(data, dict) else None
    groups = [
        (str(name), len(members) if isinstance(members, list) else 0)
        for name, members in (raw.items() if isinstance(raw, dict) else ())
    ]
    if data is not None:
        try:
            note = f"all targets ({len(load_inventory(path))})"
        except DdumpError as exc:
            note = f"all targets; but ddump refuses the inventory: {exc}"
    return groups, redact(note)


def ddump_argv(ns: argparse.Namespace) -> list[str]:
    """The ddump command line that the dialog's options and the capture filter stand for."""
    targets = (ns.targets or "").split()
    if not targets and not ns.inventory:
        raise UsageError(
            f"no targets: fill in Targets or Inventory file in the {INTERFACE} interface's "
            f"options (tshark: -o extcap.{INTERFACE}.targets:URL)"
        )
    argv = ["--format", "pcapng", "--quiet"]
    if ns.inventory:
        argv += ["--inventory", ns.inventory]
        if ns.group and ns.group != ALL_GROUPS:
            argv += ["--group", ns.group]
    capture_filter = (ns.extcap_capture_filter or "").strip() or (ns.filter or "").strip()
    if capture_filter:
        argv += ["--filter", capture_filter]
    for name in ("snaplen", "max_delay", "ca", "cert", "key"):
        value = getattr(ns, name)
        if value not in (None, "") and not (name == "snaplen" and value == "0"):
            argv += ["--" + name.replace("_", "-"), value]
    argv += ["--batch"] * ns.batch + ["--reconnect"] * ns.reconnect
    return [*argv, "--", *targets]


def fifo_path(args: Sequence[str]) -> str | None:
    """The --fifo of a --capture call, read before anything else is (see open_fifo)."""
    if "--capture" not in args:
        return None
    for index, arg in enumerate(args):
        if arg == "--fifo" and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith("--fifo="):
            return arg.removeprefix("--fifo=")
    return None


def open_fifo(path: str) -> int | str:
    """The FIFO opened for writing (waits for Wireshark's reader), or why it cannot be."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        return f"cannot open the FIFO {path}: {exc.strerror}"


def capture(ns: argparse.Namespace, fd: int, stderr: TextIO) -> int:
    """Run the ddump session into the FIFO already open as `fd`; the exit status."""
    from ddump.cli.main import ExitStatus, run
    from ddump.cli.options import parse_args
    from ddump.cli.output import PcapOutput

    reporter = ExtcapReporter(stderr)
    status = ExitStatus.ERROR
    try:
        options = parse_args(ddump_argv(ns))
        status = run(options, reporter, PcapOutput(fd, close_fd=True))
    except UsageError as exc:
        reporter.error(str(exc).replace(" (see ddump --help)", ""))
        status = ExitStatus.USAGE
    except DdumpError as exc:
        reporter.error(str(exc))
    except KeyboardInterrupt:
        status = ExitStatus.OK
    except Exception as exc:
        reporter.error(f"unexpected error: {type(exc).__name__}: {exc}")
    if status != ExitStatus.OK:
        reporter.release_warnings()
    return status


def configure(ns: argparse.Namespace, out: TextIO) -> None:
    """--extcap-config, whole or for the one option being reloaded."""
    groups, note = inventory_groups(ns.inventory)
    if ns.extcap_reload_option is None:
        lines = config_sentences(groups, note)
    else:
        option = option_named(ns.extcap_reload_option.removeprefix("--"))
        lines = group_value_sentences(option, groups, note) if option and option.reload else []
    out.write("".join(line + "\n" for line in lines))


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    """Answer one extcap call; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    # The FIFO first: tshark 4.0 waits for ever on one its extcap never opened, so even a
    # command line refused below must be refused with the FIFO open.
    fifo = fifo_path(args)
    fd = open_fifo(fifo) if fifo is not None else None
    if isinstance(fd, str):
        print(f"ddump: {fd}", file=sys.stderr)
        return 1
    try:
        ns, extra = build_parser().parse_known_args(args)
        # A reload passes the dialog's fields as pairs, a checked boolflag as `--batch true`:
        # what is left over there is no error.
        if extra and not ns.extcap_config:
            raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
        if ns.capture and not ns.fifo:
            raise UsageError("--capture needs --fifo PATH")
        if ns.extcap_interface not in (None, INTERFACE):
            raise UsageError(f"unknown interface {ns.extcap_interface!r}: this is {INTERFACE}")
    except UsageError as exc:
        print(f"{PROG}: {exc} (see {PROG} --help)", file=sys.stderr)
        if fd is not None:
            os.close(fd)
        return 2
    if fd is not None:
        return capture(ns, fd, sys.stderr)
    if ns.install:
        return install(out)
    if ns.extcap_interfaces:
        lines = interfaces_sentences()
    elif ns.extcap_dlts:
        lines = dlts_sentences()
    elif ns.extcap_config:
        configure(ns, out)
        return 0
    elif ns.extcap_capture_filter is not None:
        return check_filter(ns.extcap_capture_filter, out)
    else:
        print(f"{PROG}: nothing to do: Wireshark runs this (see {PROG} --help)", file=sys.stderr)
        return 2
    out.write("".join(line + "\n" for line in lines))
    return 0


def check_filter(text: str, out: TextIO) -> int:
    """Wireshark's capture filter check: nothing printed means valid; else the reason."""
    from ddump.bpf import filter_error

    error = filter_error(text)
    if error:
        out.write(error + "\n")
    return 0


def install(out: TextIO) -> int:
    from ddump.extcap_install import install as install_extcap

    try:
        paths = install_extcap()
    except DdumpError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        out.write(f"installed {path}\n")
    out.write(
        f"Restart Wireshark: {INTERFACE} is then in its interface list (tshark -D lists it).\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
