"""Kernel receive times for the client's connections, and the event loop that reads them.

An event loop stamps a chunk only when it gets to the socket. At high concurrency many
chunks arrive at once, and the loop reaches the last of them after it has processed the
others, so a stamp taken in user space is late by however busy the loop is. On Linux the
kernel can stamp each packet as it arrives (SO_TIMESTAMPNS) and hand the stamp over with
the bytes, but only to a `recvmsg` call, and neither uvloop nor asyncio's transports use
one. `StampingEventLoop` is asyncio's selector loop with its own socket transport for the
connections the client opens. That transport reads with `recvmsg`, so it can hand the
protocol the kernel's time of each read's last packet just before the bytes.

Only plain TCP connections are stamped: a TLS connection's socket transport feeds the
TLS layer, not the HTTP protocol, so https endpoints keep the user-space stamp.
"""

from __future__ import annotations

import asyncio
import selectors
import socket
import struct
import sys
import time
from asyncio import selector_events
from typing import Any, Callable, Coroutine, Optional, TypeVar

T = TypeVar("T")

# Linux values; Python's socket module does not name them. On 64-bit Linux the "new"
# 64-bit-time variant is the same option.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_SCM_TIMESTAMPNS = SO_TIMESTAMPNS
_TIMESPEC = struct.Struct("@qq")
# Room for one timestamp control message (16 bytes of data plus its header).
_ANCILLARY_SIZE = socket.CMSG_SPACE(_TIMESPEC.size) if hasattr(socket, "CMSG_SPACE") else 64

_perf_counter = time.perf_counter
_time = time.time


class KernelStamped:
    """Mixin for a protocol that accepts kernel receive times, set in `kernel_arrival` before each read's bytes."""

    kernel_arrival: Optional[float] = None


class ClockOffsets:
    """Converts kernel receive stamps (CLOCK_REALTIME) to perf_counter seconds.

    Only the stamp's age is read from the realtime clock, so the offset between the two
    clocks cancels out as long as it does not change between the stamp and the read. It
    can: in the virtual machine this project's benchmarks run on, the realtime clock is
    stepped 0.5 ms forward about every 100 ms. So the offset is sampled each time the
    event loop's poll returns. A socket's bytes arrived after the poll before the one that
    reported them, and the conversion uses the smallest offset seen since then, which gives
    the later of the possible times. A stamp is then never early, and at most one step late.
    """

    def __init__(self) -> None:
        self.previous = self.current = _offset()

    def earliest(self) -> float:
        """Return the smallest offset since the previous poll, to pass to `convert` later as ``since``."""
        return min(self.previous, self.current)

    def sample(self) -> None:
        """Note the offset; the event loop calls this each time its poll returns."""
        self.previous, self.current = self.current, _offset()

    def convert(self, ancillary: list[tuple[int, int, bytes]], since: Optional[float] = None) -> Optional[float]:
        """Return the SO_TIMESTAMPNS time of a recvmsg as perf_counter seconds, or None.

        ``since`` is an offset to include too, for bytes that may have waited longer than
        one poll: those on a socket that was accepted after they arrived.
        """
        for level, kind, data in ancillary:
            if kind == _SCM_TIMESTAMPNS and level == socket.SOL_SOCKET and len(data) >= _TIMESPEC.size:
                seconds, nanoseconds = _TIMESPEC.unpack_from(data)
                now = _perf_counter()
                offset = min(self.previous, self.current, _time() - now)
                if since is not None and since < offset:
                    offset = since
                arrival = seconds + nanoseconds * 1e-9 - offset
                return arrival if arrival < now else now
        return None


def _offset() -> float:
    return _time() - _perf_counter()


class _SamplingSelector(selectors.DefaultSelector):  # type: ignore[misc, valid-type]
    """The platform's default selector, sampling the clock offset each time a poll returns."""

    def __init__(self, offsets: ClockOffsets) -> None:
        super().__init__()
        self._offsets = offsets

    def select(self, timeout: Optional[float] = None) -> list[Any]:
        ready = super().select(timeout)
        self._offsets.sample()
        return ready


class _StampingTransport(selector_events._SelectorSocketTransport):  # type: ignore[name-defined]
    """asyncio's socket transport, reading with recvmsg to pass on the kernel's receive time.

    It replaces the one method of CPython's transport (3.11 to 3.13) that reads the socket
    for a plain (not buffered) protocol, keeping its handling of errors and end of file.
    """

    def _read_ready__data_received(self) -> None:
        if self._conn_lost:
            return
        try:
            data, ancillary, _, _ = self._sock.recvmsg(self.max_size, _ANCILLARY_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "reading the socket failed")
            return

        if not data:
            self._read_ready__on_eof()
            return

        protocol = self._protocol
        protocol.kernel_arrival = self._loop.clock_offsets.convert(ancillary)
        try:
            protocol.data_received(data)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "the protocol failed on the bytes it received")


class StampingEventLoop(asyncio.SelectorEventLoop):
    """asyncio's selector loop whose plain TCP connections to a `KernelStamped` protocol are stamped.

    `clock_offsets` converts kernel stamps for this loop; code that reads sockets itself
    with recvmsg (the benchmark server) uses it too.
    """

    def __init__(self) -> None:
        self.clock_offsets = ClockOffsets()
        super().__init__(selector=_SamplingSelector(self.clock_offsets))

    def _make_socket_transport(self, sock: socket.socket, protocol: Any, waiter: Any = None, *,
                               extra: Any = None, server: Any = None) -> Any:
        if isinstance(protocol, KernelStamped) and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            except OSError:
                pass
            else:
                # Python 3.12 and later check that no other transport uses the socket.
                ensure_free = getattr(self, "_ensure_fd_no_transport", None)
                if ensure_free is not None:
                    ensure_free(sock)
                return _StampingTransport(self, sock, protocol, waiter, extra, server)
        return super()._make_socket_transport(sock, protocol, waiter, extra=extra, server=server)


def kernel_stamps_supported() -> bool:
    """Return True when this platform and Python give the client kernel receive times."""
    if sys.platform != "linux" or not hasattr(socket.socket, "recvmsg"):
        return False
    transport = getattr(selector_events, "_SelectorSocketTransport", None)
    return transport is not None and hasattr(transport, "_read_ready__data_received")


def loop_factory() -> Optional[Callable[[], asyncio.AbstractEventLoop]]:
    """Return the factory of the loop that gives the best chunk times here (None: asyncio's default).

    That is `StampingEventLoop` on Linux, else uvloop when installed.
    """
    if kernel_stamps_supported():
        return StampingEventLoop
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to completion on the loop `loop_factory` chooses."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(coroutine)


def arrival_clock(url: str) -> str:
    """Return how chunk arrivals of requests to ``url`` are timed in the running loop.

    "kernel" when the loop stamps plain TCP connections, "event loop" otherwise (another
    loop, or an https URL, whose TLS layer reads the socket).
    """
    loop = asyncio.get_running_loop()
    if isinstance(loop, StampingEventLoop) and url.lower().startswith("http://"):
        return "kernel"
    return "event loop"
