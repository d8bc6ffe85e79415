"""Which live sources have bytes waiting unread in our own sockets and pipes.

A live stream that sent nothing for --max-delay is taken to have nothing older on its way, so
the others' records go out (ddump/merge.py, the idle term). That holds for the network, not for
this process: a CLI short of CPU (a busy laptop, many streams) reads its sockets late, and what
waits there would all be written late. So every live source's descriptor is in one epoll set
of its own, level-triggered: a release asks it, in one call that does not wait, which of them
hold unread bytes, and those streams hold the others back until they are read.
"""

from __future__ import annotations

import contextlib
import select


class UnreadProbe:
    """One epoll set of every live source's descriptor, asked without waiting."""

    def __init__(self) -> None:
        self._epoll: select.epoll | None = None
        self._owners: dict[int, int] = {}  # descriptor -> stream
        self._buffered: set[int] = set()  # streams whose bytes wait above the descriptor
        self._closed = False

    def slot(self, stream: int) -> UnreadSlot:
        """Where one stream's source says which descriptor its bytes arrive on."""
        return UnreadSlot(self, stream)

    def streams(self) -> list[int]:
        """The streams with bytes unread (or an end not yet read) right now."""
        if self._epoll is None or not self._owners:
            return list(self._buffered)
        owners = self._owners
        # poll() gives at most FD_SETSIZE - 1 events unless told: 1,024 targets and more
        events = self._epoll.poll(0, len(owners))
        ready = [owners[fd] for fd, _ in events if fd in owners]
        return [*ready, *self._buffered] if self._buffered else ready

    def close(self) -> None:
        self._closed = True
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        self._owners.clear()
        self._buffered.clear()

    def add(self, fd: int, stream: int) -> None:
        if self._closed:  # the session is over: nobody asks any more
            return
        if self._epoll is None:
            self._epoll = select.epoll()
        if fd in self._owners:
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)
        self._epoll.register(fd, select.EPOLLIN)
        self._owners[fd] = stream

    def set_buffered(self, stream: int, more: bool) -> None:
        if more:
            self._buffered.add(stream)
        else:
            self._buffered.discard(stream)

    def remove(self, fd: int) -> None:
        if self._owners.pop(fd, None) is not None and self._epoll is not None:
            with contextlib.suppress(OSError):  # closed already: gone from the set
                self._epoll.unregister(fd)


class UnreadSlot:
    """One stream's place in the probe: the descriptor its bytes arrive on, while it has one.

    The source must forget its descriptor before closing it: a number used again by another
    file must not count for this stream."""

    def __init__(self, probe: UnreadProbe, stream: int) -> None:
        self._probe = probe
        self._stream = stream
        self._fd: int | None = None

    def watch(self, fd: int) -> None:
        self.forget()
        self._probe.add(fd, self._stream)
        self._fd = fd

    def buffered(self, more: bool) -> None:
        """Whether bytes wait unread above the descriptor (TLS decrypts a record whole, and a
        full read can leave some of it in the ssl module's buffer)."""
        self._probe.set_buffered(self._stream, more)

    def forget(self) -> None:
        self.buffered(False)
        if self._fd is not None:
            self._probe.remove(self._fd)
            self._fd = None
