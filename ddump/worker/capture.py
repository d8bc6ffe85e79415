"""One tcpdump process: start it, wait until it listens, read its pcap, stop it, reap it.

tcpdump runs without a shell, in a session of its own (a signal to its group reaches anything
it might start) and with a parent-death signal (see spawn.py). Its exit is watched through a
pidfd on the IOLoop rather than Tornado's Subprocess SIGCHLD handler, which is bound to the first
IOLoop that used it and so never fires in a later one.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from tornado.ioloop import IOLoop
from tornado.iostream import PipeIOStream, StreamClosedError

from ddump.errors import DdumpError
from ddump.pipes import PipeReader
from ddump.protocol import BATCH_DELAY_NS
from ddump.worker.params import NS_PER_S
from ddump.worker.procfs import catches_signal, holds_packet_socket
from ddump.worker.spawn import child_setup
from ddump.worker.start import NotListening, missing_tcpdump_message, wait_listening
from ddump.worker.tcpdump import (
    LISTENING_MARK,
    RecordCounter,
    TcpdumpStats,
    classify_start_failure,
    stats_counts,
)

READ_SIZE = 65536
STDERR_KEEP = 64 * 1024  # tcpdump says a few lines; a flood of warnings must not grow us
STDERR_LINE_MAX = 4096  # a longer "line" is not one of tcpdump's statistics lines
# tcpdump's stdout pipe: the default 64 KiB holds a few hundred small packets, so a worker that
# waits for the CPU a few ms stops tcpdump, whose ring then overflows (it counts slots of the
# snapshot length, not bytes). A pipe holds packets densely: 1 MiB (the unprivileged maximum,
# /proc/sys/fs/pipe-max-size) is ~10,000 small packets of slack at no cost when it is empty.
PIPE_SIZE = 1024 * 1024
DEFAULT_PIPE_SIZE = 64 * 1024
PIPE_QUOTA_FILE = "/proc/sys/fs/pipe-user-pages-soft"
DEFAULT_PIPE_QUOTA_PAGES = 16384  # Linux's default: 64 MiB of pipes per user
# A stopping batch capture reads on for this long: the kernel hands over a block at the latest
# one second after it began (tcpdump's timeout); the rest is for tcpdump to write it out.
BATCH_HANDOVER_S = BATCH_DELAY_NS / NS_PER_S + 0.25
_EXIT_POLL_S = 0.05  # only where pidfd_open is missing (Linux < 5.3)

_tasks: set[asyncio.Task[Any]] = set()


def background(coroutine: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
    """Start a task that is kept referenced until it ends (asyncio holds only weak ones)."""
    task = asyncio.get_running_loop().create_task(coroutine, name=name)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return task


class CaptureRefused(DdumpError):
    """tcpdump could not start: `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Capture:
    """A running tcpdump whose stdout is a pcap stream."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        drop_to: pwd.struct_passwd | None = None,
        stop_grace_ns: int = 2 * NS_PER_S,
        abort_grace_ns: int = NS_PER_S // 2,
        batch: bool = False,
        pipe_size: int = PIPE_SIZE,
        stdout_fd: int | None = None,
    ) -> None:
        self.argv = list(argv)
        # tcpdump's stdout: a pipe the worker reads, or (given) the client's socket itself,
        # which tcpdump then writes to directly (see direct.py).
        self.stdout_fd = stdout_fd
        self.batch = batch  # tcpdump without --immediate-mode: see stop()
        self.pipe_size = pipe_size
        self.drop_to = drop_to
        self.stop_grace_ns = stop_grace_ns
        self.abort_grace_ns = abort_grace_ns
        self.counter = RecordCounter()
        self.returncode: int | None = None
        self.stop_reason: str | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._stdout: PipeReader | None = None
        self._stderr_stream: PipeIOStream | None = None
        self._stderr = bytearray()
        self._stderr_line = b""  # an incomplete last line
        self._counts: dict[str, int] = {}  # the latest statistics tcpdump printed
        self._reported = asyncio.Event()  # set (and replaced) whenever it prints them
        self._listening: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._exited = asyncio.Event()
        self._stderr_done = asyncio.Event()
        self._kill_timer: object | None = None
        self._kill_deadline = 0.0  # IOLoop time
        self._handover_timer: object | None = None
        self._pending_stop = ""

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def stderr_text(self) -> str:
        return self._stderr.decode("utf-8", "replace")

    @property
    def stats(self) -> TcpdumpStats:
        return TcpdumpStats.from_counts(self._counts)

    @property
    def listening(self) -> bool:
        """tcpdump said it listens: the capture started."""
        return self._listening.done() and self._listening.result()

    async def current_stats(self, timeout_ns: int) -> TcpdumpStats:
        """tcpdump's counts now: asked for with SIGUSR1 while it runs, else its exit counts.

        Waits at most `timeout_ns` in all.
        """
        if self._process is None:
            return self.stats
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_ns / NS_PER_S
        if self.running:
            reported = self._reported
            if self.stop_reason is None and catches_signal(self._process.pid, signal.SIGUSR1):
                # Only a process that handles it: tcpdump from "listening on" on; a wrapper
                # that did not exec tcpdump would die of it and leave tcpdump behind.
                self._signal(signal.SIGUSR1, group=False)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reported.wait(), max(0.0, deadline - loop.time()))
        if not self.running or self.stop_reason is not None:
            # It is on its way out, or gone: its exit counts are the final ones.
            await self.wait(max(0, int((deadline - loop.time()) * NS_PER_S)))
        return self.stats

    async def start(self, timeout_ns: int) -> None:
        """Run tcpdump and return once it listens; raise CaptureRefused if it cannot."""
        # Our own pipes, not Subprocess.STREAM: when Popen fails, Tornado 6.2's Subprocess
        # closes fds its PipeIOStreams still own, which later close someone else's socket.
        out_read, out_write = os.pipe() if self.stdout_fd is None else (-1, -1)
        err_read, err_write = os.pipe()
        if out_write != -1:
            _grow_pipe(out_write, self.pipe_size)
        try:
            self._process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out_write if self.stdout_fd is None else self.stdout_fd,
                stderr=err_write,
                start_new_session=True,
                preexec_fn=child_setup(self.drop_to),
            )
        except (OSError, subprocess.SubprocessError) as error:
            for fd in (out_read, out_write, err_read, err_write):
                if fd != -1:
                    os.close(fd)
            if isinstance(error, FileNotFoundError):
                raise CaptureRefused(503, missing_tcpdump_message(self.argv[0])) from None
            hint = ""
            if isinstance(error, subprocess.SubprocessError) and self.drop_to is not None:
                user = self.drop_to.pw_name
                hint = f" (as root, tcpdump is started as {user!r} with CAP_NET_RAW)"
            raise CaptureRefused(503, f"cannot run {self.argv[0]!r}: {error}{hint}") from None
        os.close(err_write)
        if self.stdout_fd is None:
            os.close(out_write)
            self._stdout = PipeReader(out_read)
        self._stderr_stream = PipeIOStream(err_read)
        self._watch_exit()
        background(self._read_stderr(), f"tcpdump-stderr-{self.pid}")
        try:
            listening = await wait_listening(self._listening, self.pid, timeout_ns)
        except NotListening as late:
            # Looked at before the abort closes it: tcpdump holding its packet socket has
            # opened the capture, and all it has left to do before listening is the filter.
            compiling = self.pid is not None and holds_packet_socket(self.pid)
            self.abort("start timeout")
            await self.wait()
            raise CaptureRefused(*late.refusal(compiling)) from None
        if not listening:
            stopped = self.stop_reason  # the worker stopped it (shutdown) or the client left
            self.abort("failed to start")
            await self.wait()
            if stopped is not None:
                raise CaptureRefused(503, f"the capture was stopped while starting: {stopped}")
            failure = classify_start_failure(self.stderr_text, self.returncode)
            raise CaptureRefused(failure.status, failure.message)

    async def read(self) -> bytes:
        """The next bytes tcpdump wrote, at most READ_SIZE; b"" once it is done."""
        if self._stdout is None or self.counter.cut:
            return b""
        data = await self._stdout.read(READ_SIZE)
        if not data:
            return data
        passed = self.counter.feed(data)
        if self.counter.cut:  # past the stop's time: this is the end
            self._end_handover()
            if not passed:
                return b""
        elif not passed:  # a record header held back until the next read can judge it
            return await self.read()
        return passed

    def stop(self, reason: str) -> None:
        """Ask tcpdump to finish (what it already wrote can still be read); SIGKILL after grace.

        A batch capture's kernel still holds up to a second of packets in its current block,
        which it hands over when the block is full or a second after it began: so the stream
        goes on that long, cut before the first packet captured after now, then tcpdump stops.
        """
        if self._handover_timer is not None:
            return  # already handing over: that stop's time and reason stand
        if self.batch and self.listening and self.running and self.counter.cutoff_ns is None:
            self.counter.cutoff_ns = time.time_ns()
            self._pending_stop = reason
            self._handover_timer = IOLoop.current().call_later(BATCH_HANDOVER_S, self._end_handover)
            return
        self._terminate(reason, self.stop_grace_ns)

    def _end_handover(self) -> None:
        if self._handover_timer is not None:
            IOLoop.current().remove_timeout(self._handover_timer)
            self._handover_timer = None
        self._terminate(self._pending_stop, self.stop_grace_ns)

    def abort(self, reason: str) -> None:
        """Nobody will read any more: stop tcpdump and drop the pipe, so a blocked write fails."""
        self._terminate(reason, self.abort_grace_ns)
        if self._stdout is not None:
            self._stdout.close()

    async def wait(self, timeout_ns: int = 5 * NS_PER_S) -> int | None:
        """Wait for tcpdump to exit and its stderr to end (for the statistics); bounded."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_ns / NS_PER_S
        try:
            await asyncio.wait_for(self._exited.wait(), timeout_ns / NS_PER_S)
            # stderr ends with the process, unless a descendant still holds it: don't wait long.
            left = min(1.0, deadline - loop.time())
            await asyncio.wait_for(self._stderr_done.wait(), max(0.0, left))
        except TimeoutError:
            pass
        return self.returncode

    @property
    def running(self) -> bool:
        return self._process is not None and not self._exited.is_set()

    def _terminate(self, reason: str, grace_ns: int) -> None:
        if not self.running:
            return
        if self.stop_reason is None:
            self.stop_reason = reason
        self._signal(signal.SIGTERM)
        # A stop (grace 2 s) may be followed by an abort (0.5 s): the earlier SIGKILL wins.
        loop = IOLoop.current()
        deadline = loop.time() + grace_ns / NS_PER_S
        if self._kill_timer is None or deadline < self._kill_deadline:
            if self._kill_timer is not None:
                loop.remove_timeout(self._kill_timer)
            self._kill_timer = loop.call_at(deadline, self._signal, signal.SIGKILL)
            self._kill_deadline = deadline

    def _signal(self, signum: int, *, group: bool = True) -> None:
        # Only while not reaped: after that the (group) id may belong to someone else.
        if self._process is None or self._exited.is_set():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            (os.killpg if group else os.kill)(self._process.pid, signum)

    def _watch_exit(self) -> None:
        assert self._process is not None
        loop = IOLoop.current()
        try:
            pidfd = os.pidfd_open(self._process.pid)
        except (AttributeError, OSError):
            background(self._poll_exit(), f"tcpdump-exit-{self.pid}")
            return

        def on_exit(fd: int, events: int) -> None:
            loop.remove_handler(fd)
            os.close(fd)
            # Still a zombie, so its group id cannot belong to anyone else yet: end whatever
            # is left in its group (what a --tcpdump wrapper started, say), then reap it.
            self._signal(signal.SIGKILL)
            self._reaped()

        loop.add_handler(pidfd, on_exit, IOLoop.READ)

    async def _poll_exit(self) -> None:
        assert self._process is not None
        while self._process.poll() is None:
            await asyncio.sleep(_EXIT_POLL_S)
        self._reaped()

    def _reaped(self) -> None:
        assert self._process is not None
        # The pidfd is readable once the process is a zombie, so this wait does not block.
        self.returncode = self._process.wait()
        self._exited.set()
        if self._kill_timer is not None:
            IOLoop.current().remove_timeout(self._kill_timer)
            self._kill_timer = None

    async def _read_stderr(self) -> None:
        stream = self._stderr_stream
        assert stream is not None
        try:
            while True:
                data = await stream.read_bytes(4096, partial=True)
                self._take_lines(data)
                if not self._listening.done() and LISTENING_MARK in self.stderr_text:
                    self._listening.set_result(True)
        except StreamClosedError:
            pass
        finally:
            self._keep(self._stderr_line)  # a last line without its newline
            stream.close()
            if not self._listening.done():
                self._listening.set_result(False)
            self._stderr_done.set()
            self._reported.set()

    def _take_lines(self, data: bytes) -> None:
        # Line by line: statistics update the counts (and wake who asked for them), the rest is
        # kept for messages. Statistics are not kept, or a long capture asked for its counts
        # many times would fill the kept stderr and hide a later error.
        *lines, self._stderr_line = (self._stderr_line + data).split(b"\n")
        if len(self._stderr_line) > STDERR_LINE_MAX:  # not a line tcpdump would print
            self._keep(self._stderr_line)
            self._stderr_line = b""
        for line in lines:
            counts = stats_counts(line.decode("utf-8", "replace"))
            if not counts:
                self._keep(line + b"\n")
                continue
            self._counts.update(counts)
            if "dropped by kernel" in counts:  # the last of the counts at exit, as on request
                self._reported.set()
                self._reported = asyncio.Event()

    def _keep(self, data: bytes) -> None:
        if len(self._stderr) < STDERR_KEEP:
            self._stderr += data[: STDERR_KEEP - len(self._stderr)]


def _grow_pipe(fd: int, size: int) -> None:
    """Best effort: past the per-user pipe quota the kernel refuses (EPERM)."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)


def pipe_size_for(max_captures: int, quota_pages: int | None = None) -> int:
    """tcpdump's pipe size when up to `max_captures` run: at most PIPE_SIZE, and all of them
    within half the per-user pipe quota (/proc/sys/fs/pipe-user-pages-soft; past it, every new
    pipe of the user gets 8 KiB), so the stderr pipes and the worker's own still fit."""
    if quota_pages is None:
        try:
            quota_pages = int(Path(PIPE_QUOTA_FILE).read_text())
        except (OSError, ValueError):
            quota_pages = DEFAULT_PIPE_QUOTA_PAGES
    if quota_pages <= 0:  # no quota
        return PIPE_SIZE
    share = quota_pages * 4096 // 2 // max(1, max_captures)
    size = DEFAULT_PIPE_SIZE
    while size * 2 <= min(share, PIPE_SIZE):
        size *= 2
    return size
