"""The worker's answers about itself and its captures: GET /health, GET /capture/stats."""

from __future__ import annotations

from http.client import responses
from typing import Any

from tornado.web import RequestHandler

import ddump
from ddump.protocol import CAPTURE_HEADER
from ddump.worker.capture import CaptureRefused
from ddump.worker.health import capture_check, tcpdump_version
from ddump.worker.params import NS_PER_S
from ddump.worker.registry import ENDED_KEEP, ENDED_KEEP_S
from ddump.worker.state import WorkerState
from ddump.worker.taps import Tap

STATS_TIMEOUT_NS = 3 * NS_PER_S // 2  # in all, for tcpdump's counts (the CLI waits 2 s)


class TextErrorsHandler(RequestHandler):
    """Errors as one line of text/plain: what curl and the ddump CLI show to a person."""

    def refuse(self, status: int, message: str, *, retry_after: int | None = None) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        if retry_after is not None:
            self.set_header("Retry-After", str(retry_after))
        self.finish(message.rstrip("\n") + "\n")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish(f"{status_code} {responses.get(status_code, 'Error')}\n")


class HealthHandler(TextErrorsHandler):
    """GET /health: 200 with tcpdump's version when a capture can start, else 503 and why;
    whether the worker is exposed beyond loopback either way (for load balancers and checks)."""

    def initialize(self, state: WorkerState) -> None:
        self.state = state

    async def get(self) -> None:
        state = self.state
        exposure: dict[str, Any] = {
            "exposed": bool(state.exposed),  # listening beyond loopback: see the start-up log
            "exposed_on": list(state.exposed),
            "allow": list(state.allow),  # empty: anyone who reaches it
        }
        try:
            version = await tcpdump_version(state)
            problem = await capture_check(state)
        except CaptureRefused as error:
            version, problem = {}, error.message
        if state.captures.closing:  # it still answers how its captures ended: see main.py
            problem = "the worker is stopping"
        if problem is not None:
            self.set_status(503)
            self.finish({"status": "error", "error": problem, **version, **exposure})
            return
        self.finish(
            {
                "status": "ok",
                "ddump": ddump.__version__,
                **version,
                "captures": len(state.captures),
                "max_captures": state.captures.limit,
                **exposure,
            }
        )


class CaptureStatsHandler(TextErrorsHandler):
    """GET /capture/stats?id=NAME: tcpdump's counts for one capture, running or recently ended.

    NAME is the X-Ddump-Capture header of the capture's response. The drop counts are what a
    user needs to trust a capture: the CLI asks for them when it ends.
    """

    def initialize(self, state: WorkerState) -> None:
        self.state = state

    async def get(self) -> None:
        unknown = set(self.request.query_arguments) - {"id"}
        if unknown:
            return self.refuse(400, f"unknown parameter {sorted(unknown)[0]!r}: only id=NAME")
        token = self.get_query_argument("id", "")
        found = self.state.captures.find(token) if token else None
        if found is None:
            return self.refuse(
                404,
                f"no such capture: the id is a capture's {CAPTURE_HEADER} header, known while "
                f"it runs and for {ENDED_KEEP_S // 60} minutes after it ends (the last "
                f"{ENDED_KEEP} ended captures)",
            )
        end = None
        if isinstance(found, Tap):
            stats = await found.current_stats(STATS_TIMEOUT_NS)
        else:
            stats, end = found.stats, found.end
        running = isinstance(found, Tap) and found.running
        answer: dict[str, Any] = {
            "running": running,
            "captured": stats.captured,
            "received": stats.received,
            "dropped_by_kernel": stats.dropped_by_kernel,
            "dropped_by_interface": stats.dropped_by_interface,
        }
        if end is not None:  # a stream that cannot tell how it ended (see direct.py)
            answer.update(ended=end.how, error=end.error, status=end.status)
        self.set_header("Cache-Control", "no-store")
        self.finish(answer)
