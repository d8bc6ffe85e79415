"""One `ssh://` target's capture: the system ssh client runs tcpdump remotely, stdout is the pcap.

Targets on one host share a connection (ssh_connections.py): each capture is a session on it.
A target alone on its host needs no sharing: its capture is the connection's first session,
without the separate master and the wait for its socket (16 hosts: first byte 1.98 s against
2.39 s in the median, BENCHMARKS.md part 5); ssh itself uses the user's running master, if
any, for it.

Every ssh process runs in a session of its own (a Ctrl-C at the terminal reaches ddump only,
which then stops each capture cleanly, counts included) and is killed if ddump dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import Awaitable

from ddump.cli.pipe_reader import PipeReader
from ddump.cli.sources import DataCallback, Opened, OpenedCallback, StreamFailure
from ddump.cli.ssh_connections import (
    CONNECTIONS,
    STDERR_KEEP,
    STOP_GRACE_S,
    Connection,
    SshConnections,
    spawn,
)
from ddump.cli.ssh_connections import shares_connection as shares_connection  # for the session
from ddump.cli.unread import UnreadSlot
from ddump.pcapng import CaptureCounts
from ddump.ssh_command import (
    connection_failure,
    connection_lost,
    interfaces_of,
    read_clock,
    remote_script,
    session_argv,
    session_failure,
)
from ddump.ssh_targets import SshTarget
from ddump.worker.tcpdump import LISTENING_MARK, parse_stats

# From the session's start to tcpdump's "listening on": sudo, the shell and tcpdump (a worker
# gets the same grace for its answer, ddump/cli/stream.py).
LISTEN_GRACE_S = 10.0
_SSH_FAILED = 255  # ssh's own exit status: the connection failed, not the remote command


class SshStream:
    """Runs tcpdump on one host over SSH and feeds its pcap to callbacks, like CaptureStream.

    After run() ends, `capture_counts` holds tcpdump's exit counts when it printed them.
    """

    def __init__(
        self,
        target: SshTarget,
        connect_timeout_s: float,
        connections: SshConnections = CONNECTIONS,
        *,
        shared: bool = True,
        unread: UnreadSlot | None = None,
    ) -> None:
        """`unread`: where the capture's pipe is shown to the session's probe of unread
        bytes (ddump/cli/unread.py)."""
        self.target = target
        self.unread = unread
        self.shared = shared  # False: the capture's session makes the connection itself
        self.connect_timeout_s = connect_timeout_s
        self.connections = connections
        self.capture_counts: CaptureCounts | None = None
        self._closing = False
        self._closed = asyncio.Event()
        self._process: asyncio.subprocess.Process | None = None
        self._stderr = ""
        self._listening = asyncio.Event()
        self._stderr_done = asyncio.Event()
        self._kill_timer: asyncio.TimerHandle | None = None
        self._duration_timer: asyncio.TimerHandle | None = None
        self._clock: list[tuple[int, int]] = []  # (remote clock, our time when it came)

    async def run(self, on_opened: OpenedCallback, on_data: DataCallback) -> None:
        if not self.shared:
            if self._closing:
                return
            # No `ssh -G` needed: ssh itself uses the user's master if one listens at their
            # ControlPath, else connects (and, with ControlMaster=no, is nobody's master).
            try:
                await self._capture(None, on_opened, on_data)
            finally:
                await self._reap()
            return
        connection = await self._connect()
        if connection is None:
            return
        try:
            await self._capture(connection.control_path, on_opened, on_data)
        finally:
            await self._reap()
            await self.connections.release(connection)

    async def _reap(self) -> None:
        if self._kill_timer is not None:
            self._kill_timer.cancel()
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
            await self._process.wait()

    async def _connect(self) -> Connection | None:
        acquire = asyncio.ensure_future(
            self.connections.acquire(self.target, self.connect_timeout_s)
        )
        closed = asyncio.ensure_future(self._closed.wait())
        await asyncio.wait({acquire, closed}, return_when=asyncio.FIRST_COMPLETED)
        closed.cancel()
        if not acquire.done():  # closed while connecting
            acquire.cancel()
            with contextlib.suppress(asyncio.CancelledError, StreamFailure):
                await acquire
            return None
        connection = acquire.result()
        if self._closing:
            await self.connections.release(connection)
            return None
        return connection

    async def _capture(
        self, control_path: str | None, on_opened: OpenedCallback, on_data: DataCallback
    ) -> None:
        target = self.target
        sent_ns = time.time_ns()
        try:  # its stdout: read by PipeReader, not a StreamReader (see pipe_reader.py)
            read_end, write_end = os.pipe()
        except OSError as exc:
            raise StreamFailure(f"cannot start ssh: {exc.strerror}") from None
        try:
            process = self._process = await spawn(
                session_argv(target, control_path, self.connect_timeout_s),
                stdin=subprocess.PIPE,
                stdout=write_end,
            )
            stdout = PipeReader(read_end, self.unread)
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        assert process.stdin is not None
        reader = asyncio.ensure_future(self._read_stderr(process))
        # A session that makes its own connection first has ssh's ConnectTimeout too (ssh's
        # own failure comes first, and names the host).
        grace_s = LISTEN_GRACE_S if self.shared else LISTEN_GRACE_S + self.connect_timeout_s + 5
        try:
            process.stdin.write(remote_script(target).encode("utf-8"))
            with contextlib.suppress(ConnectionError):
                await process.stdin.drain()
            if not await self._wait_until_listening(grace_s):
                self._stop_remote()
                await self._ended(process)
                raise StreamFailure(
                    f"tcpdump did not start listening within {grace_s:g} s: "
                    + self._failure(process.returncode)
                )
            if not self._listening.is_set():
                if self._closing:
                    return
                await self._ended(process)
                raise StreamFailure(self._failure(process.returncode))
            on_opened(self._opened(sent_ns))
            if target.duration_ns is not None:
                self._duration_timer = asyncio.get_running_loop().call_later(
                    target.duration_ns / 1e9, self._stop_remote
                )
            await self._pump(stdout, on_data)
            await self._ended(process)
        finally:
            stdout.close()
            if self._duration_timer is not None:
                self._duration_timer.cancel()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        stats = parse_stats(self._stderr)
        if stats.received is not None or stats.dropped_by_kernel is not None:
            self.capture_counts = CaptureCounts(stats.received, stats.dropped_by_kernel)
        if self._closing or process.returncode == 0:
            return
        raise StreamFailure(self._failure(process.returncode))

    async def _wait_until_listening(self, grace_s: float) -> bool:
        """Until tcpdump listens, the session ends or close(); False after grace_s."""
        waits = [
            asyncio.ensure_future(event.wait())
            for event in (self._listening, self._stderr_done, self._closed)
        ]
        try:
            done, _ = await asyncio.wait(
                waits, timeout=grace_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for wait in waits:
                wait.cancel()
        return bool(done)

    def _opened(self, sent_ns: int) -> Opened:
        offset = spread = None
        remote_ns = None
        if self._clock:
            remote_ns, received_ns = self._clock[0]
            # Read after we started ssh and before its line came: the offset is between.
            offset = remote_ns - received_ns
            spread = received_ns - sent_ns
        return Opened(
            clock_offset_ns=offset,
            worker_clock_ns=remote_ns,
            interfaces=interfaces_of(self._stderr.splitlines()),
            clock_spread_ns=spread or 0,
        )

    async def _pump(self, stdout: PipeReader, on_data: DataCallback) -> None:
        def deliver(chunk: bytes) -> Awaitable[None] | None:
            if self._closing:
                return None  # drained, so that the remote tcpdump is never blocked on us
            return on_data(chunk)

        await stdout.run(deliver)

    async def _ended(self, process: asyncio.subprocess.Process) -> None:
        """Wait for ssh to exit (killed after STOP_GRACE_S), then for the rest of stderr."""
        try:
            await asyncio.wait_for(process.wait(), STOP_GRACE_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stderr_done.wait(), STOP_GRACE_S)

    async def _read_stderr(self, process: asyncio.subprocess.Process) -> None:
        assert process.stderr is not None
        pending = b""
        try:
            while True:
                data = await process.stderr.read(4096)
                if not data:
                    break
                lines = (pending + data).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    self._take_line(line.decode("utf-8", "replace"))
            if pending:
                self._take_line(pending.decode("utf-8", "replace"))
        finally:
            self._stderr_done.set()

    def _take_line(self, line: str) -> None:
        if len(self._stderr) < STDERR_KEEP:
            self._stderr += line + "\n"
        if self._listening.is_set():
            return
        remote_ns = read_clock(line)
        if remote_ns is not None:
            self._clock.append((remote_ns, time.time_ns()))
        elif LISTENING_MARK in line:
            self._listening.set()

    def _failure(self, status: int | None) -> str:
        if status == _SSH_FAILED or status is None:
            if self._listening.is_set():
                return connection_lost(self.target.host, self._stderr, status)
            return connection_failure(self.target.host, self._stderr, status)
        return session_failure(self._stderr, status)

    def _stop_remote(self) -> None:
        """End standard input: the remote script stops tcpdump, which prints its counts."""
        process = self._process
        if process is None or process.stdin is None or process.returncode is not None:
            return
        with contextlib.suppress(OSError, RuntimeError):
            process.stdin.close()
        if self._kill_timer is None:
            self._kill_timer = asyncio.get_running_loop().call_later(STOP_GRACE_S * 2, self._kill)

    def _kill(self) -> None:
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()

    def close(self) -> None:
        """Stop the capture; run() returns quietly once the remote tcpdump has stopped."""
        self._closing = True
        self._closed.set()
        self._stop_remote()
