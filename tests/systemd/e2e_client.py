"""Load for the systemd end-to-end test, run *inside* the container with the deployed agent's Python.

Each client opens a new connection per request (so stops and re-activations hit fresh connections), and
every other client pauses ``--pause`` seconds between connecting and sending, as a slow client does. It
runs for ``--seconds``, or until ``--until`` exists, then prints one JSON object: how many requests were
sent and how each ended, and a few answers for the test to verify. Standalone (stdlib only): the wheel has
no test helpers.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import threading
import time
from collections import Counter


def one(path: str, body: bytes, pause: float) -> tuple[str, bytes]:
    """('200', body) for an answer; ('lost:<why>', b'') when none came."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    try:
        s.connect(path)
        if pause:
            time.sleep(pause)
        s.sendall(
            b"POST /v1/sign HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                return "lost:closed before an answer", b""
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
        while len(rest) < length:
            chunk = s.recv(65536)
            if not chunk:
                return "lost:answer cut short", b""
            rest += chunk
        return head.split(b" ")[1].decode(), rest
    except OSError as e:
        return f"lost:{type(e).__name__}", b""
    finally:
        s.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--challenge", required=True, help="the /auth/action/init answer to sign, as JSON")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--pause", type=float, default=0.0, help="pause of every other client before sending")
    ap.add_argument("--seconds", type=float, default=0.0)
    ap.add_argument("--until", help="run until this file exists")
    args = ap.parse_args()
    body = json.dumps({"challenge": json.loads(args.challenge)}).encode()
    outcomes: Counter[str] = Counter()
    samples: list[str] = []
    lock = threading.Lock()
    end = time.monotonic() + args.seconds

    def running() -> bool:
        return not os.path.exists(args.until) if args.until else time.monotonic() < end

    def client(i: int) -> None:
        pause = args.pause if i % 2 else 0.0
        while running():
            status, answer = one(args.socket, body, pause)
            with lock:
                outcomes[status] += 1
                if status == "200" and len(samples) < 5:
                    samples.append(answer.decode())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"outcomes": dict(outcomes), "samples": samples}))


if __name__ == "__main__":
    main()
