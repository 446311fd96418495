"""One batch over HTTP: the body the front end posts to the Serve application and the body a
replica answers, with the typed protocol messages inside (ondemand/protocol.py).

    request  = MAGIC | u32 header length | header JSON | arrays
    header   = {"message": protocol.encode(Infer), "arrays": [[name, shape...], ...]}
    response = MAGIC | u32 header length | header JSON | arrays
    header   = {"message": protocol.encode(Result | BatchFailed), "replica": ..., "node": ...,
                "device": ..., "pid": ..., "started": ..., "loaded_at": ..., "arrays": [...]}

Arrays are little-endian float32, back to back, in header order.  In a request they are the
clips' samples, named by job, when the audio travels in the body (`cluster.audio_transport =
"body"`: the replica may be on another machine); with "path" there are none and each item's
`audio` is the spool file's path.  In a response they are the embeddings, named by job, when the
request carried audio (the replica cannot write into the front end's storage.dir).

Pure (numpy, no ray): the front end (cluster/dispatch.py) and the replica (worker/ray_replica.py)
share this one encoder and decoder.  `decode_*` raises ProtocolError for anything the encoder
could not have written, so a mismatched replica fails loudly, not with a wrong result.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ondemand import protocol
from ondemand.errors import ProtocolError

CONTENT_TYPE = "application/x-ondemand-batch"
MAGIC = b"ODB1"
_LEN = struct.Struct("<I")
_DTYPE = np.dtype("<f4")


@dataclass(frozen=True)
class BatchRequest:
    op: protocol.Infer
    audio: dict[str, np.ndarray] | None = None  # job -> samples; None: read op's paths


@dataclass(frozen=True)
class BatchResponse:
    answer: protocol.Result | protocol.BatchFailed
    replica: str
    node: str
    device: str
    pid: int
    started: float  # wall time the replica began the batch
    loaded_at: float  # wall time the replica's model was ready (a cold start ends there)
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)  # job -> embedding


def _pack(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    header = {**header, "arrays": [[name, *a.shape] for name, a in arrays.items()]}
    head = json.dumps(header).encode("utf-8")
    parts = [MAGIC, _LEN.pack(len(head)), head]
    parts.extend(np.ascontiguousarray(a, dtype=_DTYPE).tobytes() for a in arrays.values())
    return b"".join(parts)


def _unpack(body: bytes, what: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    if len(body) < 8 or body[:4] != MAGIC:
        raise ProtocolError(f"{what}: not an ondemand batch body ({body[:16]!r})")
    (n,) = _LEN.unpack_from(body, 4)
    try:
        header = json.loads(body[8:8 + n])
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"{what}: header is not JSON ({e})") from None
    if not isinstance(header, dict) or not isinstance(header.get("message"), str):
        raise ProtocolError(f"{what}: header needs a 'message' string")
    specs = header.pop("arrays", None)
    if not isinstance(specs, list):
        raise ProtocolError(f"{what}: header needs an 'arrays' list")
    arrays: dict[str, np.ndarray] = {}
    offset = 8 + n
    for spec in specs:
        if (not isinstance(spec, list) or not spec or not isinstance(spec[0], str)
                or not all(isinstance(d, int) and d >= 0 for d in spec[1:])):
            raise ProtocolError(f"{what}: bad array spec {spec!r}")
        count = int(np.prod(spec[1:], dtype=np.int64)) if len(spec) > 1 else 1
        size = count * _DTYPE.itemsize
        if offset + size > len(body):
            raise ProtocolError(f"{what}: array {spec[0]!r} runs past the end of the body")
        arrays[spec[0]] = np.frombuffer(body, _DTYPE, count, offset).reshape(spec[1:]).astype(
            np.float32)
        offset += size
    if offset != len(body):
        raise ProtocolError(f"{what}: {len(body) - offset} bytes after the last array")
    return header, arrays


def encode_request(req: BatchRequest) -> bytes:
    return _pack({"message": protocol.encode(req.op)}, req.audio or {})


def decode_request(body: bytes) -> BatchRequest:
    header, arrays = _unpack(body, "batch request")
    if set(header) != {"message"}:
        extra = sorted(set(header) - {"message"})
        raise ProtocolError(f"batch request: unknown header field(s) {extra}")
    op = protocol.decode_op(header["message"])
    if not isinstance(op, protocol.Infer):
        raise ProtocolError(f"batch request: expected an infer op, got {op.TAG!r}")
    if arrays and set(arrays) != {i.job for i in op.items}:
        raise ProtocolError("batch request: the audio arrays do not match the batch's jobs")
    return BatchRequest(op=op, audio=arrays or None)


_META = {"replica": str, "node": str, "device": str, "pid": int, "started": float,
         "loaded_at": float}


def encode_response(resp: BatchResponse) -> bytes:
    header = {"message": protocol.encode(resp.answer), "replica": resp.replica,
              "node": resp.node, "device": resp.device, "pid": resp.pid,
              "started": resp.started, "loaded_at": resp.loaded_at}
    return _pack(header, resp.embeddings)


def decode_response(body: bytes) -> BatchResponse:
    header, arrays = _unpack(body, "batch response")
    meta: dict[str, Any] = {}
    for key, tp in _META.items():
        value = header.get(key)
        ok = isinstance(value, int | float) and not isinstance(value, bool) if tp is float \
            else type(value) is tp
        if not ok:
            raise ProtocolError(f"batch response: {key!r} must be {tp.__name__}, got {value!r}")
        meta[key] = float(value) if tp is float and value is not None else value
    extra = set(header) - {"message", *_META}
    if extra:
        raise ProtocolError(f"batch response: unknown header field(s) {sorted(extra)}")
    answer = protocol.decode_event(header["message"])
    if not isinstance(answer, protocol.Result | protocol.BatchFailed):
        raise ProtocolError(f"batch response: expected result or batch_failed, got {answer.TAG!r}")
    return BatchResponse(answer=answer, embeddings=arrays, **meta)
