"""A scripted HTTP(S) server standing in for ddump-worker in CLI tests (its own thread)."""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import tornado.web
from tornado.httpserver import HTTPServer
from tornado.iostream import StreamClosedError
from tornado.netutil import bind_sockets

from ddump.pcap import LINKTYPE_LINUX_SLL2, PcapHeader


def read_request(connection: socket.socket) -> bytes | None:
    """An HTTP request's head read from a stand-in server's connection (None: it closed first)."""
    request = b""
    while b"\r\n\r\n" not in request:
        piece = connection.recv(4096)
        if not piece:
            return None
        request += piece
    return request


def sll2_packet(payload: bytes, ifindex: int = 1) -> bytes:
    """A LINUX_SLL2 frame: SLL2 header, then `payload` as the network layer."""
    return struct.pack(">HHIHBB8s", 0x0800, 0, ifindex, 1, 0, 6, b"\x02" * 6) + payload


def pcap_stream(
    packets: list[tuple[int, bytes]],
    *,
    linktype: int = LINKTYPE_LINUX_SLL2,
    nano: bool = True,
    big_endian: bool = False,
) -> bytes:
    """A pcap byte stream of (timestamp ns, frame) packets."""
    order = ">" if big_endian else "<"
    out = [PcapHeader(linktype=linktype, nano=nano, big_endian=big_endian).to_bytes()]
    for ts, frame in packets:
        sub = ts % 10**9 if nano else (ts % 10**9) // 1000
        out.append(struct.pack(order + "IIII", ts // 10**9, sub, len(frame), len(frame)))
        out.append(frame)
    return b"".join(out)


@dataclass
class Script:
    """What the server answers on one path."""

    status: int = 200
    # float: pause, in seconds; Event: wait until the test sets it
    body: list[bytes | float | threading.Event] = field(default_factory=list)
    end: str = "finish"  # finish | abort (cut the connection) | hang (until the client leaves)
    headers: dict[str, str] = field(default_factory=dict)
    clock_ns: int | None = None  # X-Ddump-Clock; None: now
    clock: bool = True  # False: no X-Ddump-Clock at all (another server, an older worker)
    answer_after_s: float = 0.0  # before the status line, as a worker starting tcpdump


class _Handler(tornado.web.RequestHandler):
    def initialize(self, worker: FakeWorker) -> None:
        self.worker = worker

    async def get(self, *_: Any) -> None:
        worker = self.worker
        worker.requests.append((self.request.path, dict(self.request.headers)))
        worker.uris.append(self.request.uri or "")
        if worker.basic_auth is not None:
            expected = "Basic " + base64.b64encode(":".join(worker.basic_auth).encode()).decode()
            if self.request.headers.get("Authorization") != expected:
                self.set_status(401)
                self.set_header("Content-Type", "text/html")
                self.finish("<html><head><title>401 Authorization Required</title></head></html>")
                return
        script = worker.next_script(self.request.path)
        if script is None:
            self.set_status(404)
            self.finish("no such path\n")
            return
        await asyncio.sleep(script.answer_after_s)
        self.set_status(script.status)
        if script.status == 200:
            self.set_header("Content-Type", "application/vnd.tcpdump.pcap")
            clock = script.clock_ns if script.clock_ns is not None else time.time_ns()
            if script.clock:
                self.set_header("X-Ddump-Clock", str(clock))
        for name, value in script.headers.items():
            self.set_header(name, value)
        try:
            await self.flush()
            for part in script.body:
                if isinstance(part, float):
                    await asyncio.sleep(part)
                elif isinstance(part, threading.Event):
                    deadline = time.monotonic() + 30
                    while not part.is_set() and time.monotonic() < deadline:
                        await asyncio.sleep(0.01)
                else:
                    self.write(part)
                    await self.flush()
            if script.end == "abort":
                assert self.request.connection is not None
                self.request.connection.close()  # type: ignore[attr-defined]
                return
            if script.end == "hang":
                deadline = time.monotonic() + 30
                while not self.worker_gone and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                return
        except StreamClosedError:
            return
        self.finish()

    worker_gone = False

    def on_connection_close(self) -> None:
        self.worker_gone = True
        self.worker.disconnects += 1


class FakeWorker:
    """Serve `routes` on 127.0.0.1 (TLS when `ssl_context` is given) from a thread."""

    def __init__(
        self,
        routes: dict[str, Script | list[Script]],
        *,
        ssl_context: ssl.SSLContext | None = None,
        basic_auth: tuple[str, str] | None = None,
    ) -> None:
        self.routes = routes
        self.ssl_context = ssl_context
        self.basic_auth = basic_auth
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.uris: list[str] = []
        self.disconnects = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    def next_script(self, path: str) -> Script | None:
        """A list of scripts answers one request each, in order; the last one repeats."""
        script = self.routes.get(path)
        if isinstance(script, list):
            return script.pop(0) if len(script) > 1 else script[0]
        return script

    def url(self, path: str = "/capture", scheme: str | None = None) -> str:
        scheme = scheme or ("https" if self.ssl_context else "http")
        host = "localhost" if self.ssl_context else "127.0.0.1"
        return f"{scheme}://{host}:{self.port}{path}"

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = tornado.web.Application([(r"/(.*)", _Handler, {"worker": self})])
        server = HTTPServer(app, ssl_options=self.ssl_context)
        sockets = bind_sockets(0, "127.0.0.1")
        self.port = sockets[0].getsockname()[1]
        server.add_sockets(sockets)
        self._ready.set()
        await self._stop.wait()
        server.stop()

    def __enter__(self) -> FakeWorker:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *_: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@contextmanager
def fake_workers(
    *scripts: dict[str, Script | list[Script]], **kwargs: Any
) -> Iterator[list[FakeWorker]]:
    workers = [FakeWorker(routes, **kwargs) for routes in scripts]
    for w in workers:
        w.__enter__()
    try:
        yield workers
    finally:
        for w in workers:
            w.__exit__()
