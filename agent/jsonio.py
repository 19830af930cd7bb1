"""JSON in and out on the request path: answers and audit records written by orjson, bodies read by json.

Encoding a signature's answer and its audit record cost about 10 µs with ``json`` and about 1 µs with
orjson. What orjson cannot write (integers beyond 64 bits, keys that are not strings, lone surrogates) is
written by the standard library, as ASCII with escapes. Reading stays with the standard library: orjson
saves about 1.5 µs on a sign request's body but reads integers beyond 64 bits as floats, silently, and a
guard against that (a scan for long digit runs) costs more than it saves.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson


def _not_json(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON does not, and they must never reach a Dfns payload.
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    # A number too large for a double (1e400) would read as inf, and be written back as Infinity.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is beyond the range of a JSON number the agent can carry")
    return value


# Built once: json.loads and json.dumps build a new decoder or encoder per call when given options.
_DECODER = json.JSONDecoder(parse_constant=_not_json, parse_float=_finite)
# ASCII with escapes: the only way to write a lone surrogate that every JSON reader accepts.
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)


def loads(raw: bytes) -> Any:
    """Strict JSON from bytes in any encoding RFC 8259 names (as ``json.loads`` reads them), without ``NaN``,
    ``Infinity`` or a number that overflows a double; raises ``ValueError`` (or ``UnicodeDecodeError``,
    ``RecursionError``) on anything else."""
    return _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON; values JSON has no type for are written as ``str(value)``."""
    try:
        return orjson.dumps(value, default=str)
    except orjson.JSONEncodeError:
        return _ENCODER.encode(value).encode("ascii")
