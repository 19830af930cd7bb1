"""The few ssh-agent protocol messages the benchmark speaks (RFC 9987 framing: uint32 length, type, body).

Kept separate from the load generator so that framing and signature decoding can be checked once at
set-up (find the P-256 identity, sign, verify) before anything is timed.
"""

from __future__ import annotations

import socket
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

SSH_AGENT_FAILURE = 5
SSH2_AGENTC_REQUEST_IDENTITIES = 11
SSH2_AGENT_IDENTITIES_ANSWER = 12
SSH2_AGENTC_SIGN_REQUEST = 13
SSH2_AGENT_SIGN_RESPONSE = 14
P256_KEY_TYPE = b"ecdsa-sha2-nistp256"


def ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def frame(msg_type: int, body: bytes = b"") -> bytes:
    return struct.pack(">IB", len(body) + 1, msg_type) + body


def read_string(buf: bytes, pos: int) -> tuple[bytes, int]:
    (n,) = struct.unpack_from(">I", buf, pos)
    end = pos + 4 + n
    if end > len(buf):
        raise ValueError("truncated ssh string")
    return buf[pos + 4 : end], end


def frame_length(buf: bytes | bytearray) -> int:
    """Bytes of the first complete message in ``buf``, or 0 when it is not complete yet."""
    if len(buf) < 4:
        return 0
    (n,) = struct.unpack_from(">I", buf, 0)
    return 4 + n if len(buf) >= 4 + n else 0


def sign_request(key_blob: bytes, data: bytes) -> bytes:
    return frame(SSH2_AGENTC_SIGN_REQUEST, ssh_string(key_blob) + ssh_string(data) + struct.pack(">I", 0))


def _roundtrip(sock_path: str, message: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(sock_path)
        s.sendall(message)
        buf = b""
        while not (n := frame_length(buf)):
            data = s.recv(65536)
            if not data:
                raise ConnectionError("ssh-agent closed the connection")
            buf += data
        return buf[:n]


def identities(sock_path: str) -> list[tuple[bytes, str]]:
    """(key blob, comment) of every identity the agent holds."""
    reply = _roundtrip(sock_path, frame(SSH2_AGENTC_REQUEST_IDENTITIES))
    if reply[4] != SSH2_AGENT_IDENTITIES_ANSWER:
        raise ValueError(f"ssh-agent answered type {reply[4]} to REQUEST_IDENTITIES")
    (count,) = struct.unpack_from(">I", reply, 5)
    pos, out = 9, []
    for _ in range(count):
        blob, pos = read_string(reply, pos)
        comment, pos = read_string(reply, pos)
        out.append((blob, comment.decode(errors="replace")))
    return out


def p256_blob_for(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """The ssh wire form of a P-256 public key, to find *our* key among the agent's identities."""
    from cryptography.hazmat.primitives import serialization

    point = public_key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return ssh_string(P256_KEY_TYPE) + ssh_string(b"nistp256") + ssh_string(point)


def der_signature(response: bytes) -> bytes:
    """DER ECDSA signature from a SIGN_RESPONSE frame (raises ValueError on FAILURE or a malformed answer)."""
    if len(response) < 5 or response[4] != SSH2_AGENT_SIGN_RESPONSE:
        kind = response[4] if len(response) > 4 else None
        raise ValueError(f"ssh-agent answered type {kind} to SIGN_REQUEST")
    sig, _ = read_string(response, 5)
    alg, pos = read_string(sig, 0)
    if alg != P256_KEY_TYPE:
        raise ValueError(f"unexpected signature algorithm {alg!r}")
    inner, _ = read_string(sig, pos)
    r, pos = read_string(inner, 0)
    s, _ = read_string(inner, pos)
    return encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(s, "big"))


def verify(public_key: ec.EllipticCurvePublicKey, response: bytes, data: bytes) -> None:
    """Raises InvalidSignature / ValueError unless ``response`` holds a valid signature over ``data``."""
    public_key.verify(der_signature(response), data, ec.ECDSA(hashes.SHA256()))


def check(sock_path: str, public_key: ec.EllipticCurvePublicKey) -> bytes:
    """Find our P-256 key in the agent and sign once; returns its key blob for the load generator."""
    wanted = p256_blob_for(public_key)
    held = identities(sock_path)
    if not any(blob == wanted for blob, _ in held):
        names = ", ".join(f"{read_string(b, 0)[0].decode(errors='replace')} ({c})" for b, c in held) or "none"
        raise ValueError(f"ssh-agent does not hold the benchmark's P-256 key; it holds: {names}")
    data = b"bench set-up check"
    verify(public_key, _roundtrip(sock_path, sign_request(wanted, data)), data)
    return wanted
