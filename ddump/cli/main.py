"""`ddump`: the entry point, and the one place errors become messages and exit statuses."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import logging
import os
import resource
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import replace
from urllib.parse import quote, urlsplit, urlunsplit

from ddump.cli.compress import compression_of
from ddump.cli.files import (
    FileSource,
    looks_like_file,
    parse_file_source,
    refuse_to_overwrite_an_input,
)
from ddump.cli.options import Options, parse_args
from ddump.cli.output import Output, PcapOutput
from ddump.cli.report import Reporter
from ddump.cli.runs import SessionSettings
from ddump.cli.session import Session
from ddump.cli.tls import ContextCache, TlsFiles
from ddump.errors import DdumpError, UsageError
from ddump.protocol import BATCH_PARAM
from ddump.ssh_targets import SUDO_PARAM, SshTarget, is_ssh_url, parse_ssh_target
from ddump.targets import Target, parse_target, redact, unique_names

PASSWORD_ENV = "DDUMP_PASSWORD"
# Signals this close together are one stop: GNU `timeout` signals ddump and then its process
# group, a shell may pass one Ctrl-C twice. A second Ctrl-C typed by a user comes later.
SAME_STOP_S = 0.5


class ExitStatus(enum.IntEnum):
    OK = 0
    ERROR = 1  # a target failed, or the output could not be written
    USAGE = 2  # nothing was started
    KILLED = 130  # a second Ctrl-C


def collect_targets(
    options: Options, warn: Callable[[str], None] = lambda _: None
) -> list[Target | SshTarget | FileSource]:
    """Targets from the arguments (URLs or capture files), then the inventories, in order.

    Settings come, from the strongest: the target's own (its URL, its inventory keys), the
    command line (--filter, -s, --batch), the inventory's defaults. `warn` hears of repeats.
    """
    sources: list[Target | SshTarget | FileSource] = []
    for arg in options.urls:
        if is_ssh_url(arg):
            sources.append(
                with_ssh_defaults(parse_ssh_target(arg, default_filter=options.filter), options)
            )
        elif looks_like_file(arg):
            sources.append(parse_file_source(arg))
        else:
            target = with_url_password(parse_target(arg, default_filter=options.filter))
            sources.append(with_worker_defaults(target, options))
    if options.inventories:
        from ddump.inventory import load_inventory  # YAML only when there is an inventory
    typed: dict[str, object] = {"filter": options.filter, "snaplen": options.snaplen}
    typed = {name: value for name, value in typed.items() if value is not None}
    if options.batch:
        typed[BATCH_PARAM] = True
    if options.sudo:
        typed[SUDO_PARAM] = True  # for ssh targets only
    for path in options.inventories:
        sources += load_inventory(path, options.groups, overrides=typed)
    if not sources:
        raise UsageError("the inventory selects no targets")
    if sum(isinstance(s, FileSource) and s.path == "-" for s in sources) > 1:
        raise UsageError("standard input (-) can be given once")
    sources = without_repeats(sources, warn)
    named = iter(unique_names([s for s in sources if isinstance(s, Target | SshTarget)]))
    return [next(named) if isinstance(s, Target | SshTarget) else s for s in sources]


def with_ssh_defaults(
    target: SshTarget, options: Options, default_filter: str | None = None
) -> SshTarget:
    """-s, --batch, --sudo (and --filter, for inventory targets) where the target gives none."""
    return replace(
        target,
        filter=target.filter if target.filter is not None else default_filter,
        snaplen=target.snaplen if target.snaplen is not None else options.snaplen,
        batch=target.batch or options.batch,
        sudo=target.sudo or options.sudo,
    )


def with_url_password(target: Target) -> Target:
    """`https://ops@host`: the password comes from $DDUMP_PASSWORD, out of the process list.

    Unset or empty is an error, as for an inventory's password_env: a silently empty password
    would only come back as "401 Unauthorized".
    """
    if target.username is None or target.password is not None:
        return target
    password = os.environ.get(PASSWORD_ENV)
    if not password:
        state = "is empty" if password is not None else "is not set"
        raise UsageError(
            f"{target.name}: user {target.username!r} needs a password, and {PASSWORD_ENV} "
            f"{state}: set {PASSWORD_ENV} (write {target.username}:@ in the URL for none)"
        )
    return replace(target, password=password)


def without_repeats(
    sources: list[Target | SshTarget | FileSource], warn: Callable[[str], None]
) -> list[Target | SshTarget | FileSource]:
    """Keep the first of targets that are one capture (a host in two inventory groups):
    captured twice, every packet of it would be written twice."""
    first: dict[object, Target | SshTarget | FileSource] = {}
    kept: list[Target | SshTarget | FileSource] = []
    for source in sources:
        key = _capture_key(source)
        seen = first.setdefault(key, source)
        if seen is source:
            kept.append(source)
        elif isinstance(source, Target | SshTarget):
            where = f" ({source.name})" if source.name != seen.name else ""
            warn(f"{redact(source.url)}{where} is given twice: captured once, as {seen.name}")
        else:
            warn(f"{source.name} is given twice: read once, as {seen.name}")
    return kept


def _capture_key(source: Target | SshTarget | FileSource) -> object:
    """What makes two sources one capture: the request URL (query included, after defaults),
    or a file's device and inode."""
    if isinstance(source, SshTarget):
        return ("ssh", source.url.lower(), source.ssh_options)
    if isinstance(source, Target):
        parts = urlsplit(source.url)
        return ("url", urlunsplit(parts._replace(netloc=parts.netloc.lower())))
    if source.path == "-":
        return ("stdin",)
    try:
        info = os.stat(source.path)
    except OSError:  # said when it is opened
        return ("path", source.path)
    return ("file", info.st_dev, info.st_ino)


def with_query_default(target: Target, key: str, value: str) -> Target:
    """The same target with `key=value` in its query, unless the query gives `key` already."""
    parts = urlsplit(target.url)
    if any(item.partition("=")[0] == key for item in parts.query.split("&")):
        return target
    query = "&".join(q for q in (parts.query, f"{key}={quote(value, safe='')}") if q)
    return replace(target, url=urlunsplit(parts._replace(query=query)))


def with_worker_defaults(target: Target, options: Options) -> Target:
    """`-s SNAPLEN` and `--batch` for a target whose URL or inventory entry gives neither."""
    if options.snaplen is not None:
        target = with_query_default(target, "snaplen", str(options.snaplen))
    if options.batch:
        target = with_query_default(target, BATCH_PARAM, "1")
    return target


def check_tls(targets: list[Target | SshTarget | FileSource], contexts: ContextCache) -> None:
    """Load every TLS file now, so a typo fails before anything connects."""
    for target in targets:
        if isinstance(target, Target) and target.url.startswith("https:"):
            contexts.get(target.ca, target.cert, target.key)
    if contexts.defaults.cert or contexts.defaults.key:
        contexts.get(None, None, None)


async def run_session(session: Session) -> bool:
    loop = asyncio.get_running_loop()
    interrupts = 0
    last = -SAME_STOP_S

    def on_signal(signum: int) -> None:
        nonlocal interrupts, last
        now = loop.time()
        if interrupts and now - last < SAME_STOP_S:
            return  # the same stop, told twice
        interrupts, last = interrupts + 1, now
        name = signal.Signals(signum).name
        if session.waiting_for_batches:  # stop now, still cleanly
            session.stop(name)
        elif interrupts > 1:
            os._exit(ExitStatus.KILLED)
        else:
            session.stop_after_batches(name)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        return await session.run()
    finally:
        session.output.close()  # in the loop: it unregisters from it


def raise_open_files_limit() -> None:
    """Every target holds a socket or a file: take the hard `ulimit -n`, not the soft 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and soft != resource.RLIM_INFINITY:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(options: Options, reporter: Reporter, output: Output | None = None) -> ExitStatus:
    """Capture as `options` say, into `output` (default: -w); the extcap passes its FIFO."""
    targets = collect_targets(options, reporter.warn)
    raise_open_files_limit()
    contexts = ContextCache(TlsFiles(options.ca, options.cert, options.key))
    check_tls(targets, contexts)
    if output is None:
        refuse_to_overwrite_an_input(options.write, targets)
        if options.rotation.rotates or compression_of(options.write):
            from ddump.cli.savefiles import RotatingOutput

            # Each file's name is checked as it comes: `-C` could reach an input's (x.pcap1).
            output = RotatingOutput(
                options.rotation,
                reporter,
                lambda path: refuse_to_overwrite_an_input(path, targets),
            )
        else:
            output = PcapOutput.open(options.write)
    if options.format == "pcapng":
        from ddump.pcap import DEFAULT_SNAPLEN
        from ddump.pcapng import PcapngWriter  # only for --format pcapng

        # One snaplen in every IDB (every record is cut to it on the way in): libpcap, and so
        # tcpdump, refuses a pcapng whose interfaces differ in snaplen, as targets asked with
        # different -s or ?snaplen= would.
        output.pcapng = PcapngWriter(snaplen=DEFAULT_SNAPLEN)
        output.section_comment = "ddump capture of " + ", ".join(t.name for t in targets)
    settings = SessionSettings(
        max_delay_ns=options.max_delay_ns,
        connect_timeout_s=options.connect_timeout_s,
        count=options.count,
        duration_ns=options.duration_ns,
        reconnect=options.reconnect,
    )
    session = Session(targets, contexts, output, reporter, settings)
    failed = asyncio.run(run_session(session))
    return ExitStatus.ERROR if failed else ExitStatus.OK


def hold_stderr_open() -> None:
    """Started with descriptor 2 closed (`2>&-`), point it at /dev/null: else the next file
    opened (the -w output) would get it, and anything written to "stderr" would land there."""
    try:
        os.fstat(2)
    except OSError:
        fd = os.open(os.devnull, os.O_WRONLY)
        if fd != 2:
            os.dup2(fd, 2)
            os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ddump; returns the exit status (see ExitStatus and `ddump --help`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    hold_stderr_open()
    logging.basicConfig(level=logging.CRITICAL)  # asyncio's own logs would only repeat ours
    try:
        options = parse_args(args)
    except UsageError as exc:
        Reporter(quiet=False, verbose=False).error(str(exc))
        return ExitStatus.USAGE
    reporter = Reporter(quiet=options.quiet, verbose=options.verbose)
    # Every record is a tuple: the cyclic collector would walk millions of them for nothing
    # (no cycles are made per record). Measured merging 4 x 100k records: about 10 % faster.
    gc.freeze()
    gc.set_threshold(100_000, 20, 100)
    try:
        return run(options, reporter)
    except UsageError as exc:
        reporter.error(str(exc))
        return ExitStatus.USAGE
    except DdumpError as exc:
        reporter.error(str(exc))
        return ExitStatus.ERROR
    except KeyboardInterrupt:
        return ExitStatus.OK
    except Exception as exc:
        if options.traceback:
            traceback.print_exc()
        reporter.error(f"unexpected error: {type(exc).__name__}: {exc} (--traceback shows more)")
        return ExitStatus.ERROR


if __name__ == "__main__":
    sys.exit(main())
