"""A connection whose every byte must come from the process that connected (``SCM_CREDENTIALS``).

``SO_PEERCRED`` names the process that called ``connect()``; nothing stops it from handing the socket to
another process (fork, ``SCM_RIGHTS``) and then exec-ing the program a rule admits. For connections that an
``exes`` rule governs, the agent therefore reads with ``recvmsg`` and ``SO_PASSCRED`` (set on the listening
socket, so even bytes sent before the accept carry it): the kernel stamps every write with its writer's
pid and never merges writes of different writers into one read, so a byte from any other process is
seen, and refused, before it reaches the HTTP parser.

asyncio's transports read with ``recv`` and drop ancillary data, hence this small transport of its own.
Only these connections pay for it; the others keep the event loop's own (uvloop's) transports. Writing
follows asyncio's flow control, as theirs does: over the high-water mark the protocol is told to pause
writing, and to resume once the buffer is down to the low-water mark.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from typing import Any

_UCRED = struct.Struct("3i")
_ANCILLARY = socket.CMSG_SPACE(_UCRED.size)
_READ = 64 * 1024
_HIGH_WATER = 64 * 1024  # asyncio's default; the low-water mark is a quarter of the high


def enable_sender_credentials(sock: socket.socket) -> None:
    """Ask the kernel to stamp writes with their writer's credentials (inherited by accepted sockets)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)


def sender_pid(ancillary: list[tuple[int, int, bytes]]) -> int:
    """The writer's pid from a ``recvmsg``'s ancillary data; 0 when the kernel attached none."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(data) >= _UCRED.size:
            return int(_UCRED.unpack_from(data)[0])
    return 0


class SenderCheckedTransport(asyncio.Transport):
    """A non-blocking Unix socket transport that hands ``protocol`` only bytes written by ``pid``; the first
    byte from another writer stops reading and calls ``on_other_sender`` with that writer's pid."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol: asyncio.Protocol,
        pid: int,
        on_other_sender: Callable[[int], None],
    ) -> None:
        super().__init__()
        self._loop, self._sock, self._protocol, self._pid = loop, sock, protocol, pid
        self._on_other_sender = on_other_sender
        self._fd = sock.fileno()
        self._buffer = bytearray()
        self._closing = False
        self._reading = False
        self._writing = False
        self._lost = False
        self._high_water, self._low_water = _HIGH_WATER, _HIGH_WATER // 4
        self._protocol_paused = False  # told to pause writing, not yet to resume
        protocol.connection_made(self)
        self.resume_reading()

    # --- reading ---

    def _read_ready(self) -> None:
        try:
            data, ancillary, _, _ = self._sock.recvmsg(_READ, _ANCILLARY)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._fatal(e)
            return
        if not data:
            self.pause_reading()
            if not self._protocol.eof_received():
                self.close()
            return
        writer = sender_pid(ancillary)
        if writer != self._pid:
            self.pause_reading()
            self._on_other_sender(writer)
            return
        self._protocol.data_received(data)

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._reading and not self._closing:
            self._reading = True
            self._loop.add_reader(self._fd, self._read_ready)

    def is_reading(self) -> bool:
        return self._reading

    # --- writing ---

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._lost or not data:
            return
        if not self._buffer:
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as e:
                self._fatal(e)
                return
            data = memoryview(data)[sent:]
            if not data:
                return
        self._buffer += data
        if not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._write_ready)
        self._maybe_pause_protocol()

    def _write_ready(self) -> None:
        try:
            sent = self._sock.send(self._buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._fatal(e)
            return
        del self._buffer[:sent]
        self._maybe_resume_protocol()
        if not self._buffer:
            self._writing = False
            self._loop.remove_writer(self._fd)
            if self._closing:
                self._finish(None)

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = _HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high_water, self._low_water = high, low
        self._maybe_pause_protocol()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low_water, self._high_water

    def _maybe_pause_protocol(self) -> None:
        if not self._protocol_paused and len(self._buffer) > self._high_water:
            self._protocol_paused = True
            self._tell_protocol(self._protocol.pause_writing)

    def _maybe_resume_protocol(self) -> None:
        if self._protocol_paused and len(self._buffer) <= self._low_water:
            self._protocol_paused = False
            self._tell_protocol(self._protocol.resume_writing)

    def _tell_protocol(self, call: Callable[[], None]) -> None:
        try:
            call()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: BLE001 - as asyncio's transports: reported, not raised into write()
            self._loop.call_exception_handler(
                {
                    "message": f"protocol.{call.__name__}() failed",
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )

    def can_write_eof(self) -> bool:
        return False

    # --- closing ---

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Stop reading; close once what was written has been sent."""
        if self._closing:
            return
        self._closing = True
        self.pause_reading()
        if not self._buffer:
            self._loop.call_soon(self._finish, None)

    def abort(self) -> None:
        self._buffer.clear()
        self._closing = True
        self.pause_reading()
        self._finish(None)

    def _fatal(self, exc: Exception) -> None:
        self._buffer.clear()
        self._closing = True
        self.pause_reading()
        self._finish(exc)

    def _finish(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)
        self._sock.close()
        self._protocol.connection_lost(exc)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._sock
        if name == "peername":
            return self._sock.getpeername()
        return default
