"""The model deployment: one backend per replica, windows from all sessions batched with @serve.batch."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from typing import Any

import torch
from ray import serve

from serve_app import ray_env
from serve_app.config import BatchConfig, ModelConfig
from serve_app.model.backends import make_backend, warm_up
from serve_app.observability.metrics import ModelMetrics
from serve_app.prediction import WindowPrediction, WindowRequest

log = logging.getLogger("ray.serve.da3.model")
LOOP_TAG = ":loop"  # in a request's tag: a loop-verification window (session_worker), counted in stats
HEALTH_FORWARD_FRESH_S = 30.0  # a successful forward this recent makes the health check's own forward unneeded


@serve.deployment(
    ray_actor_options={"num_gpus": 1},
    max_ongoing_requests=64,  # must exceed max_batch_size so batches can fill
    health_check_period_s=10,
    health_check_timeout_s=60,
    graceful_shutdown_timeout_s=20,
)
class DA3ModelServer:
    def __init__(self, model: dict[str, Any]):
        self.cfg = ModelConfig.model_validate(model)
        self.backend = make_backend(self.cfg)
        self.batch_sizes: Counter[int] = Counter()
        self.loop_batch_sizes: Counter[int] = Counter()  # loop-verification windows per forward that had any
        self.windows = 0
        self.failures = 0
        self.busy_s = 0.0
        self.last_error: str | None = None
        self.batching = BatchConfig()  # replaced by reconfigure(user_config)
        self.metrics = ModelMetrics()
        # Set while no forward runs. @serve.batch forms the next batch as soon as a request arrives, even while
        # the previous batch still holds the model, so windows trickling in during a forward would each become a
        # batch of one. Holding them at this gate until the forward ends lets them form one full batch.
        self.idle = asyncio.Event()
        self.idle.set()
        self.last_forward_ok = 0.0  # monotonic time of the last successful forward (health checks reuse it)
        # A compiled model is warmed up before the replica reports healthy: here for the default batching (or
        # the configured batch sizes), and in reconfigure (which Serve runs before the replica is ready) for
        # any larger max_batch_size the user_config brings.
        warm_up(self.backend, self.cfg, self.batching.max_batch_size)
        self.backend.health_check()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        b = BatchConfig.model_validate(user_config or {})
        warm_up(self.backend, self.cfg, b.max_batch_size)
        self.batching = b
        self.infer_batch.set_max_batch_size(b.max_batch_size)
        self.infer_batch.set_batch_wait_timeout_s(b.batch_wait_timeout_s)

    def _run(self, requests: list[WindowRequest]) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        started = time.monotonic()
        try:
            preds = self.backend.forward_windows(requests)
            results = [{"ok": True, "prediction": _slim(p)} for p in preds]
            self.last_forward_ok = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - isolate the poisoned item below
            log.warning("batch of %d failed (%s); retrying items one by one", len(requests), exc)
            results = []
            for r in requests:
                try:
                    results.append({"ok": True, "prediction": _slim(self.backend.forward_windows([r])[0])})
                except Exception as item_exc:  # noqa: BLE001
                    self.failures += 1
                    self.last_error = f"{type(item_exc).__name__}: {item_exc}"
                    results.append({"ok": False, "error": self.last_error})
        elapsed = time.perf_counter() - t0
        self.busy_s += elapsed
        self.metrics.batch_size.observe(len(requests))
        self.metrics.forward_ms.observe(elapsed * 1000.0)
        bad = sum(1 for r in results if not r["ok"])
        if bad:
            self.metrics.failures.inc(bad)
        for res in results:
            res["batch_size"] = len(requests)
            res["model_ms"] = elapsed * 1000.0
            res["started"] = started  # this replica's monotonic clock; infer() turns it into batch_wait_ms
        return results

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)  # both replaced by reconfigure()
    async def infer_batch(self, requests: list[WindowRequest]) -> list[dict[str, Any]]:
        self.batch_sizes[len(requests)] += 1
        self.windows += len(requests)
        loops = sum(1 for r in requests if LOOP_TAG in (r.tag or ""))
        if loops:
            self.loop_batch_sizes[loops] += 1
        # The forward runs in a thread so health checks and queueing stay responsive.
        self.idle.clear()
        try:
            return await asyncio.to_thread(self._run, requests)
        finally:
            self.idle.set()

    async def infer(self, request: WindowRequest) -> dict[str, Any]:
        """One window; returns {"ok", "prediction" | "error", "batch_size", "model_ms", "batch_wait_ms"}."""
        arrived = time.monotonic()
        await self.idle.wait()  # see __init__: arrivals during a forward batch together afterwards
        res = await self.infer_batch(request)
        # Arrival -> forward start (idle gate, batch wait, thread hop), on this replica's clock only, so the
        # caller can split its round trip without comparing clocks across machines.
        res = dict(res)
        res["batch_wait_ms"] = (res.pop("started", arrived) - arrived) * 1000.0
        return res

    async def infer_windows(self, requests: list[WindowRequest]) -> list[dict[str, Any]]:
        """Several windows in one call (a session's batch of loop-verification windows): queued for @serve.batch
        together, so they share a forward (with whatever other windows wait) instead of trickling in one by one.
        One result per request, in order, as infer() gives it."""
        return list(await asyncio.gather(*(self.infer(r) for r in requests)))

    async def stats(self) -> dict[str, Any]:
        gpu = None
        if torch.cuda.is_available():
            gpu = {"allocated_bytes": torch.cuda.memory_allocated(), "reserved_bytes": torch.cuda.memory_reserved(),
                   "max_allocated_bytes": torch.cuda.max_memory_allocated()}
        return {"replica": serve.get_replica_context().replica_id.unique_id, "info": self.backend.info(),
                "batch_sizes": dict(self.batch_sizes),
                "loop_batch_sizes": dict(self.loop_batch_sizes), "windows": self.windows, "failures": self.failures,
                "busy_s": self.busy_s, "last_error": self.last_error, "gpu_memory": gpu,
                "batching": self.batching.model_dump(), "ray_env": ray_env.in_effect()}

    async def info(self) -> dict[str, Any]:
        return self.backend.info()

    async def check_health(self) -> None:
        # Serving traffic proves health; only an idle replica spends a forward on it.
        if time.monotonic() - self.last_forward_ok < HEALTH_FORWARD_FRESH_S:
            return
        await asyncio.to_thread(self.backend.health_check)


def _slim(pred: WindowPrediction) -> WindowPrediction:
    """Drop the input images from the reply: the caller has them (saves N*H*W*3 bytes per window)."""
    return dataclasses.replace(pred, images=None)


__all__ = ["DA3ModelServer", "WindowPrediction", "WindowRequest"]
