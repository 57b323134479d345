"""Ray settings the service is tuned for. The shipped Serve configs carry them as the application's
`runtime_env.env_vars` (tests/config/test_config_files.py checks they match), so every replica, and the session actor
the ingress creates, starts with them; the tests and benchmarks pass the same dict to `ray.init`.

Measured on loopback (bench/README.md, "Serving overhead, session 5"): ~10 ms off the time from a window's
forward to its points reaching the client. Serve's RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 and
RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0 were measured too and changed nothing there, so Serve's defaults stay.
"""

from __future__ import annotations

import os

# Objects up to this size travel inside the task RPC instead of through the shared-memory object store (Ray's
# default cut is 100 KiB). Measured here (bare actor calls, p50): a 0.3 MB argument 5.1 -> 3.6 ms, a 0.6 MB one
# 5.0 -> 4.5 ms and its return 4.9 -> 3.3 ms; at 1.2 MB the two paths are even and at 2.4 MB the store is faster
# (argument 5.6 vs 7.2 ms). Windows at CPU sizes (154x112: images 0.2 MB, depth + confidence 0.6 MB, a record's
# points and the snapshot 0.5 MB) go inline; windows at 504x378 (3-12 MB) keep using the store.
# The size is read by the process that creates the object: the caller for arguments, the callee for returns.
MAX_INLINE_OBJECT_BYTES = 2**20

RAY_ENV_VARS: dict[str, str] = {
    "RAY_max_direct_call_object_size": str(MAX_INLINE_OBJECT_BYTES),
}


def in_effect() -> dict[str, str | None]:
    """This process's values of the settings above (None: unset, Ray's default). `/stats` reports them per
    process kind, so an operator sees whether a cluster runs with them."""
    return {k: os.environ.get(k) for k in RAY_ENV_VARS}
