"""A pickle-free encoding for what the session journal stores (records, accepted frames, worker snapshots).

One `.npz` archive per object, read with `allow_pickle=False`: the arrays (and bytes, as uint8 arrays) as
entries, the structure as JSON in the `meta` entry. Only plain values (None, bool, int, float, str, bytes,
list, tuple, dict), numpy arrays without objects, and the dataclasses named in ALLOWED are written or read:
loading a file can build nothing else, whatever its contents.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections import deque
from typing import Any

import numpy as np

from serve_app.recon.geometry import Sim3
from serve_app.recon.posegraph import Edge, GraphParams
from serve_app.recon.reconstruction import FrameInput, WorldFrame
from serve_app.sessions.session_store import ResultRecord

# (Sim3, Edge, GraphParams: the pose graph of a global_consistency session's snapshot.)
ALLOWED: dict[str, type] = {"FrameInput": FrameInput, "WorldFrame": WorldFrame, "ResultRecord": ResultRecord,
                            "Sim3": Sim3, "Edge": Edge, "GraphParams": GraphParams}
_SKIP = {"ResultRecord": {"body"}}  # per-connection encodings, never stored
FORMAT = 1


class CodecError(ValueError):
    """Bytes that are not a journal object of this format (torn, foreign or from an older version)."""


def dumps(obj: Any) -> bytes:
    arrays: list[np.ndarray] = []

    def array_ref(a: np.ndarray, tag: str) -> dict:
        if a.dtype.hasobject:
            raise TypeError("object arrays are not stored")
        arrays.append(a)
        return {tag: len(arrays) - 1}

    def enc(x: Any) -> Any:
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, (int, float)):
            return x
        if isinstance(x, np.generic):
            return enc(x.item())
        if isinstance(x, np.ndarray):
            return array_ref(x, "nd")
        if isinstance(x, (bytes, bytearray, memoryview)):
            return array_ref(np.frombuffer(bytes(x), np.uint8), "b")
        if isinstance(x, tuple):
            return {"t": [enc(v) for v in x]}
        if isinstance(x, (list, deque)):
            return [enc(v) for v in x]
        if isinstance(x, dict):
            return {"m": [[enc(k), enc(v)] for k, v in x.items()]}
        name = type(x).__name__
        if dataclasses.is_dataclass(x) and ALLOWED.get(name) is type(x):
            skip = _SKIP.get(name, set())
            return {"dc": name, "f": {f.name: enc(getattr(x, f.name)) for f in dataclasses.fields(x)
                                      if f.name not in skip}}
        raise TypeError(f"the journal does not store {type(x).__name__}")

    meta = json.dumps({"format": FORMAT, "value": enc(obj)}, separators=(",", ":")).encode()
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(meta, np.uint8), **{f"a{i}": a for i, a in enumerate(arrays)})
    return buf.getvalue()


def loads(data: bytes) -> Any:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            entries = {k: z[k] for k in z.files}
        meta = json.loads(entries.pop("meta").tobytes().decode("utf-8"))
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CodecError("unknown journal format")
        return _decode(meta["value"], entries)
    except CodecError:
        raise
    except Exception as exc:  # noqa: BLE001 - zip, JSON, shape or field errors: all mean "not ours"
        raise CodecError(f"not a journal object: {type(exc).__name__}") from None


def _decode(x: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(x, list):
        return [_decode(v, arrays) for v in x]
    if not isinstance(x, dict):
        return x
    if "nd" in x:
        return arrays[f"a{int(x['nd'])}"]
    if "b" in x:
        return arrays[f"a{int(x['b'])}"].tobytes()
    if "t" in x:
        return tuple(_decode(v, arrays) for v in x["t"])
    if "m" in x:
        return {_decode(k, arrays): _decode(v, arrays) for k, v in x["m"]}
    if "dc" in x:
        cls = ALLOWED[x["dc"]]  # KeyError for any other name
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: _decode(v, arrays) for k, v in x["f"].items() if k in names})
    raise CodecError("unknown tag")
