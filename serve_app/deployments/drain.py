"""Is Serve draining this replica? Serve 2.60 has no public hook for the start of a graceful shutdown: it flags
the replica (`_shutting_down`), waits for ongoing requests to end, and only then calls `__del__`. An open
WebSocket never ends by itself, so without this check every stream would hold the replica until the force-kill
at `graceful_shutdown_timeout_s` and clients would see an abnormal close (1006).

The flag is private, so it is read defensively: if Ray's internals change, `replica_draining()` returns None,
the ingress logs one warning, and streams fall back to the force-kill (clients still reconnect on 1006, and no
accepted frame is lost because accepted frames live in the session actor). tests/sessions/test_faults.py redeploys an
app mid-stream and asserts the 1012 close, so an upgrade that breaks this fails the suite.
"""

from __future__ import annotations

import ray


def replica_draining() -> bool | None:
    """True once this Serve replica has started its graceful shutdown; None if that cannot be determined."""
    try:
        worker = ray._private.worker.global_worker
        replica_actor = worker.actors.get(worker.actor_id)
        flag = getattr(getattr(replica_actor, "_replica_impl", None), "_shutting_down", None)
    except Exception:  # noqa: BLE001 - internals moved: report "unknown"
        return None
    return flag if isinstance(flag, bool) else None
