"""The worker's HTTP API: GET /capture streams a live pcap, GET /health says it can."""

from __future__ import annotations

import asyncio
import logging
import select
import time
from collections.abc import Callable

from tornado.http1connection import HTTP1Connection
from tornado.iostream import StreamClosedError
from tornado.web import Application, RequestHandler

from ddump.protocol import (
    BODY_DIRECT,
    BODY_HEADER,
    CAPTURE_HEADER,
    CAPTURE_PATH,
    CLOCK_HEADER,
    INTERFACES_HEADER,
    PCAP_CONTENT_TYPE,
    STATS_PATH,
)
from ddump.worker.capture import Capture, CaptureRefused
from ddump.worker.direct import HangupWatch, end_of, take_socket
from ddump.worker.filter import FilterError, compose_filter, tcpdump_argv
from ddump.worker.health import capture_started
from ddump.worker.info import CaptureStatsHandler, HealthHandler, TextErrorsHandler
from ddump.worker.interfaces import interfaces_header
from ddump.worker.params import NS_PER_S, CaptureParams, parse_query
from ddump.worker.registry import CaptureEnd
from ddump.worker.state import WorkerState
from ddump.worker.taps import Tap
from ddump.worker.tcpdump import error_lines

log = logging.getLogger("ddump.worker")

RETRY_AFTER_S = 5
STATS_TIMEOUT_NS = 3 * NS_PER_S // 2  # in all, for tcpdump's counts (the CLI waits 2 s)
CLIENT_CHECK_S = 1.0  # how often a capture checks that its client is still connected
_LOG_FILTER_MAX = 200


def seconds_text(nanoseconds: int) -> str:
    """`1.234s` from integer nanoseconds, without a float."""
    return f"{nanoseconds // NS_PER_S}.{nanoseconds % NS_PER_S // 10**6:03d}s"


def _show_filter(text: str | None) -> str:
    if text is None:
        return "-"
    shown = text if len(text) <= _LOG_FILTER_MAX else text[:_LOG_FILTER_MAX] + "..."
    return repr(shown)


class CaptureHandler(TextErrorsHandler):
    """GET /capture: tcpdump's pcap, for as long as the client reads: relayed as a chunked
    response, or written by tcpdump itself to a client that takes that (see direct.py)."""

    def initialize(self, state: WorkerState) -> None:
        self.state = state
        self.capture: Tap | None = None
        self.client_gone = False

    def refuse(self, status: int, message: str, *, retry_after: int | None = None) -> None:
        """Answer an error, and log it (rate-limited): a refused capture is never silent."""
        self._log_refusal(status, message)
        super().refuse(status, message, retry_after=retry_after)

    def _log_refusal(self, status: int, message: str) -> None:
        self.state.refusals.refused(
            f"capture refused ({status}): client={self.client()} "
            f"filter={_show_filter(self._asked_filter())}: {message.splitlines()[0]}"
        )

    def _asked_filter(self) -> str | None:
        values = self.request.query_arguments.get("filter")
        return values[-1].decode("utf-8", "replace") if values else None

    def client(self) -> str:
        forwarded = self.request.headers.get("X-Forwarded-For")
        address = "unix" if self.state.unix_socket else str(self.request.remote_ip)
        return f"{address} (X-Forwarded-For: {forwarded})" if forwarded else address

    async def get(self) -> None:
        if self.request.version != "HTTP/1.1":
            # Only chunked encoding tells a clean end from a cut one, and HTTP/1.0 has none.
            return self.refuse(505, "a capture needs HTTP/1.1 (its body is chunked)")
        try:
            params = parse_query(self.request.query_arguments)
            bpf = compose_filter(params.filter, self.state.exclusions)
        except FilterError as error:
            return self.refuse(400, str(error))
        captures = self.state.captures
        if captures.closing:
            return self.refuse(503, "the worker is shutting down", retry_after=RETRY_AFTER_S)
        if captures.full():
            return self.refuse(
                503,
                f"too many captures on this worker ({captures.limit} running; "
                "the limit is ddump-worker --max-captures)",
                retry_after=RETRY_AFTER_S,
            )
        argv = tcpdump_argv(
            self.state.tcpdump,
            bpf,
            snaplen=params.snaplen,
            count=params.count,
            buffer_kib=self.state.buffer_kib,
            batch=params.batch,
        )

        def make() -> Capture:
            return Capture(
                argv,
                drop_to=self.state.drop_to,
                stop_grace_ns=self.state.stop_grace_ns,
                abort_grace_ns=self.state.abort_grace_ns,
                batch=params.batch,
                pipe_size=self.state.pipe_size,
            )

        # A batch capture's stop hands over its kernel's last blocks, and a count ends tcpdump
        # itself: those are one client's own. Identical live captures share one tcpdump,
        # unless tcpdump writes to the client directly.
        shareable = self.state.share and not params.batch and params.count is None
        key = tuple(argv)
        direct = self._wants_direct(params) and (not shareable or captures.alone(key))
        number, capture = captures.open(
            key if shareable and not direct else None, make, direct_key=key if direct else None
        )
        self.capture = capture
        try:
            if direct:
                await self._run_direct(number, capture, params)
            else:
                await self._run(number, capture, params)
        finally:
            capture.abort("ended")
            captures.remove(capture)

    def _wants_direct(self, params: CaptureParams) -> bool:
        """tcpdump writes the body itself (see direct.py): the client takes it, and the stream
        needs no cut by the worker (a batch capture's stop)."""
        asked = self.request.headers.get(BODY_HEADER, "").strip().lower() == BODY_DIRECT
        return asked and not params.batch and isinstance(self.request.connection, HTTP1Connection)

    async def _run_direct(self, number: int, capture: Tap, params: CaptureParams) -> None:
        head = {**self._head(capture), BODY_HEADER: BODY_DIRECT, "Connection": "close"}
        try:
            sock = await take_socket(self, head)
        except StreamClosedError:
            self.client_gone = True  # before tcpdump ran: nothing to stop
            return
        capture.capture.stdout_fd = sock.fileno()
        watch = HangupWatch(sock, self.on_connection_close)
        try:
            await self._run(number, capture, params, direct=True)
        finally:
            watch.stop()
            sock.close()  # after the end was recorded: the client asks for it when it sees this

    async def _run(
        self, number: int, capture: Tap, params: CaptureParams, *, direct: bool = False
    ) -> None:
        try:
            await capture.start(self.state.start_timeout_ns)
        except CaptureRefused as refused:
            if self.client_gone:  # tcpdump was stopped because nobody waits for it any more
                log.info("capture %d: client=%s left before it started", number, self.client())
                return None
            if not direct:
                return self.refuse(refused.status, refused.message)
            self._log_refusal(refused.status, refused.message)
            end = CaptureEnd("refused", refused.message, refused.status)
            return self.state.captures.remove(capture, end)
        capture_started(self.state)
        if self.client_gone:
            capture.abort("client closed")
        started_ns = time.monotonic_ns()
        log.info(
            "capture %d start: client=%s filter=%s snaplen=%s count=%s duration=%s%s pid=%s%s",
            number,
            self.client(),
            _show_filter(params.filter),
            params.snaplen or "-",
            params.count or "-",
            seconds_text(params.duration_ns) if params.duration_ns else "-",
            " batch" if params.batch else "",
            capture.pid,
            " (shared)" if capture.joined else "",
        )
        timer = None
        if params.duration_ns is not None:
            timer = asyncio.get_running_loop().call_later(
                params.duration_ns / NS_PER_S, capture.stop, "duration reached"
            )
        try:
            if direct:
                while capture.running:  # tcpdump writes to the client: only its end to see
                    await capture.capture.wait(60 * NS_PER_S)
            else:
                await self._stream(capture)
        finally:
            if timer is not None:
                timer.cancel()
            capture.abort("client closed" if self.client_gone else "ended")
            await capture.wait()
            if direct:
                will_ask = not self.client_gone
                self.state.captures.remove(capture, end_of(capture), will_ask=will_ask)
            self._log_end(number, capture, params, time.monotonic_ns() - started_ns, direct)

    def _head(self, capture: Tap) -> dict[str, str]:
        """The headers of a capture's response (its status is 200)."""
        head = {
            "Content-Type": PCAP_CONTENT_TYPE,
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",  # nginx: stream, do not buffer
            CLOCK_HEADER: str(time.time_ns()),
            CAPTURE_HEADER: capture.token,
        }
        interfaces = interfaces_header()  # as tcpdump starts: the map is as of its start
        if interfaces:
            head[INTERFACES_HEADER] = interfaces
        return head

    async def _stream(self, capture: Tap) -> None:
        for name, value in self._head(capture).items():
            self.set_header(name, value)
        watch = asyncio.ensure_future(self._watch_client())
        capture.on_cut_off = self._cut  # it stalled others sharing its tcpdump
        try:
            await self.flush()  # headers now: the client knows tcpdump listens
            while True:
                chunk = await capture.read()
                if not chunk:
                    break
                self.write(chunk)
                # Backpressure: the pipe is read again only once the client took this chunk,
                # so a slow client fills the pipe, tcpdump blocks, and the kernel counts drops,
                # not our memory.
                await self.flush()
            if capture.stop_reason is None and await capture.wait() not in (0, None):
                # tcpdump died on its own: no terminating chunk, so the client sees a failure
                # (a cut stream) rather than a capture that merely ended.
                self._cut()
            if not self.client_gone:
                await self.finish()  # the terminating chunk: the client can tell a clean end
        except StreamClosedError:
            self.client_gone = True
        finally:
            watch.cancel()

    def _cut(self) -> None:
        """End the response without its terminating chunk: the client sees a failure."""
        # The stream, not HTTP1Connection.close(): that forgets the future a pending flush
        # waits for (a client cut off while the worker writes to it), which would never end.
        connection = self.request.connection
        if isinstance(connection, HTTP1Connection):
            connection.stream.close()
        self.client_gone = True

    async def _watch_client(self) -> None:
        # Tornado sees a client leave only while nothing it sent waits unread in the buffer:
        # after a pipelined request (or one stray CRLF) a quiet capture would run forever.
        # So the socket itself is asked, every CLIENT_CHECK_S: hung up, or shut for writing?
        connection = self.request.connection
        if not isinstance(connection, HTTP1Connection) or connection.stream.closed():
            return
        stream = connection.stream
        poller = select.poll()
        poller.register(stream.socket.fileno(), select.POLLRDHUP)
        while not self.client_gone and not stream.closed():
            await asyncio.sleep(CLIENT_CHECK_S)
            if not stream.closed() and poller.poll(0):
                self.on_connection_close()  # stops tcpdump
                connection.close()  # and nothing more is written to a client that left
                return

    def _log_end(
        self, number: int, capture: Tap, params: CaptureParams, elapsed_ns: int, direct: bool
    ) -> None:
        stats = capture.stats

        def count(value: int | None) -> str:
            return "?" if value is None else str(value)

        log.info(
            "capture %d end: client=%s filter=%s duration=%s bytes=%s packets=%s "
            "captured=%s received=%s dropped=%s reason=%s exit=%s",
            number,
            self.client(),
            _show_filter(params.filter),
            seconds_text(elapsed_ns),
            *(("-",) * 2 if direct else (capture.relayed, capture.counter.records)),
            count(stats.captured),
            count(stats.received),
            count(stats.dropped_by_kernel),
            capture.stop_reason or _exit_reason(capture, params),
            capture.returncode,
        )

    def on_connection_close(self) -> None:
        self.client_gone = True
        if self.capture is not None:
            self.capture.abort("client closed")

    def on_finish(self) -> None:
        if self.capture is not None:
            self.capture.abort("ended")


def _exit_reason(capture: Tap, params: CaptureParams) -> str:
    if capture.returncode == 0:
        return "count reached" if params.count else "tcpdump exited"
    detail = error_lines(capture.stderr_text).replace("\n", "; ")
    return f"tcpdump failed: {detail or 'no message'}"


def _request_logger(state: WorkerState) -> Callable[[RequestHandler], None]:
    def log_request(handler: RequestHandler) -> None:
        # Captures log their own start, end and refusal lines; a load balancer's /health
        # polls are noise while they answer 200, but a 503 is a refusal like any other.
        status = handler.get_status()
        if status < 400 or isinstance(handler, CaptureHandler):
            return
        request = handler.request
        state.refusals.refused(f"{status} {request.method} {request.uri} from {request.remote_ip}")

    return log_request


def make_app(state: WorkerState) -> Application:
    """The Tornado application of one worker."""
    return Application(
        [
            (CAPTURE_PATH, CaptureHandler, {"state": state}),
            (CAPTURE_PATH + STATS_PATH, CaptureStatsHandler, {"state": state}),
            (r"/health", HealthHandler, {"state": state}),
        ],
        log_function=_request_logger(state),
    )
