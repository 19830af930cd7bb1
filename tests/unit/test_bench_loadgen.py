"""The load generator's epoll driver against a real Unix-socket server that closes a connection once its
client is finished: that close is no error, and the driver still waits for the clients still in flight."""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from pathlib import Path

from bench.loadgen import NOOP, Job, Target, _Pool, http_request, run_job

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"


def _serve(conn: socket.socket, delay: float, end: float, answered: threading.Event) -> None:
    """Answer each request after ``delay``; once the window has ended, close the connection when it is idle
    (as a server's idle timeout would)."""
    conn.settimeout(0.05)
    with conn:
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                try:
                    data = conn.recv(4096)
                except TimeoutError:
                    if time.monotonic() > end + 0.05:
                        return
                    continue
                if not data:
                    return
                buf += data
            buf = buf[buf.index(b"\r\n\r\n") + 4 :]
            time.sleep(delay)
            conn.sendall(ANSWER)
            answered.set()


def test_a_close_after_the_client_finished_is_no_error() -> None:
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "s.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen()
        start = time.monotonic() + 0.1
        duration = 0.4
        job = Job(Target(NOOP, path), conns=2, start_at=start, duration=duration, sample=0)

        slow_answered = threading.Event()

        def accept() -> None:
            # The first client is answered at once, the second slowly: the first finishes (and is closed)
            # while the second is still waiting for its last answer.
            for delay, answered in ((0.0, threading.Event()), (1.0, slow_answered)):
                conn, _ = listener.accept()
                args = (conn, delay, start + duration, answered)
                threading.Thread(target=_serve, args=args, daemon=True).start()

        server = threading.Thread(target=accept, daemon=True)
        server.start()
        pool = _Pool([http_request("GET", "/v1/credentials")] * 8, [None] * 8)
        result = run_job(job, pool)
        listener.close()
    assert result.errors == 0, result.error_examples
    # The driver waited for the slow client's answer (sent after the window) instead of stopping at the close.
    assert slow_answered.is_set()
