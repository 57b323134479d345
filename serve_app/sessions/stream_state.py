"""The incremental part of a worker snapshot (the session's `stream_state`), merged by the session store.

A worker commits a snapshot with every window. Most of it is small and replaced whole; what is large and never
changes once made (the loop keyframes' images and depth samples) travels once: the snapshot's INCREMENTAL entry is
{"keep": [key, ...], "new": {key: item}} with only the items the store does not hold yet, and the store keeps
{"keep": keys, "new": every kept item}, the same shape, so a stored snapshot restores like a fresh one. An item
the store never got (a commit lost with a replica) is simply missing after a takeover: a loop that cannot be
verified, never a wrong one. The durable backends store the items apart from the rest (`split`/`join`), each
written once, so a commit's write does not grow with the carried keyframes.
"""

from __future__ import annotations

import json
from typing import Any

INCREMENTAL = "incremental"


def merge(held: Any, new: Any) -> Any:
    """The snapshot to store: `new` with its incremental items completed from what the store `held`."""
    if not isinstance(new, dict) or not isinstance(new.get(INCREMENTAL), dict):
        return new
    inc = new[INCREMENTAL]
    old = held.get(INCREMENTAL) if isinstance(held, dict) else None
    have = old.get("new", {}) if isinstance(old, dict) else {}
    fresh = inc.get("new", {})
    items = {}
    for k in inc.get("keep", []):
        if k in fresh:
            items[k] = fresh[k]
        elif k in have:
            items[k] = have[k]
    return {**new, INCREMENTAL: {"keep": list(items), "new": items}}


def items(snap: Any) -> dict:
    """The kept incremental items of a (stored or fresh) snapshot."""
    inc = snap.get(INCREMENTAL) if isinstance(snap, dict) else None
    if not isinstance(inc, dict):
        return {}
    fresh = inc.get("new", {})
    return {k: fresh[k] for k in inc.get("keep", []) if k in fresh}


def split(state: Any) -> tuple[Any, dict]:
    """(the state with its incremental items left out, the kept items): a durable store writes the items apart,
    each once, and the rest (small) whole on every commit."""
    inc = state.get(INCREMENTAL) if isinstance(state, dict) else None
    if not isinstance(inc, dict):
        return state, {}
    kept = items(state)
    return {**state, INCREMENTAL: {"keep": list(kept), "new": {}}}, kept


def join(base: Any, stored: dict) -> Any:
    """`split` undone from what a store read back; an item it lacks is left out (a loop that cannot be verified)."""
    inc = base.get(INCREMENTAL) if isinstance(base, dict) else None
    if not isinstance(inc, dict):
        return base
    have = {k: stored[k] for k in inc.get("keep", []) if k in stored}
    return {**base, INCREMENTAL: {"keep": list(have), "new": have}}


def item_field(key: Any) -> str:
    """A stored item's name (JSON of its key: the worker's keys are keyframe indices)."""
    return json.dumps(key, separators=(",", ":"))


def item_key(field: str | bytes) -> Any:
    return json.loads(field)
