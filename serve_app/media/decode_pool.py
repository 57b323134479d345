"""Fair use of the ingress's image-decode pool by sessions.

A cheap-to-send image can cost seconds of CPU to decode. Each session (key: its worker object) gets
  - at most `slots` decodes running or queued in the pool at once, so one session cannot hold every thread and
    the pool's FIFO queue serves sessions in turn, and
  - a CPU budget: decode CPU seconds (measured with the decoding thread's own clock) refill at `cpu_s_per_s` up
    to `burst_s`; a decode may overdraw it, and while it is overdrawn the session's frames are refused with
    DECODE_BUDGET_EXCEEDED (not fatal, `details.retry_after_s`). The session and its connection go on.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from serve_app.errors import ErrorCode, ServiceError


class CpuBudget:
    """Token bucket of CPU seconds that may go negative (the cost of a decode is known only afterwards)."""

    def __init__(self, rate: float, burst: float, now: float):
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = burst, now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def wait_s(self, now: float) -> float:
        """0 if a decode may start now, else the seconds until it may."""
        self._refill(now)
        return 0.0 if self.tokens > 0 else (-self.tokens) / self.rate + 1e-3

    def charge(self, cpu_s: float, now: float) -> None:
        self._refill(now)
        self.tokens -= cpu_s


class _Share:
    def __init__(self, slots: int, budget: CpuBudget):
        self.slots = asyncio.Semaphore(slots)
        self.budget = budget
        self.cpu_s = 0.0  # total decode CPU charged


def _timed(fn: Callable, args: tuple) -> tuple[Any, float, BaseException | None]:
    t0 = time.thread_time()
    try:
        return fn(*args), time.thread_time() - t0, None
    except BaseException as exc:  # noqa: BLE001 - re-raised by the caller once the CPU is charged
        return None, time.thread_time() - t0, exc


class DecodeGate:
    def __init__(self, pool: Executor, cpu_s_per_s: float, burst_s: float, slots: int,
                 clock: Callable[[], float] = time.monotonic):
        self.pool, self.rate, self.burst, self.slots, self.clock = pool, cpu_s_per_s, burst_s, slots, clock
        self._shares: weakref.WeakKeyDictionary[Any, _Share] = weakref.WeakKeyDictionary()

    def share(self, key: Any) -> _Share:
        s = self._shares.get(key)
        if s is None:
            s = self._shares[key] = _Share(self.slots, CpuBudget(self.rate, self.burst, self.clock()))
        return s

    def check(self, key: Any) -> None:
        """Raise DECODE_BUDGET_EXCEEDED (not fatal) while the session's decode budget is overdrawn."""
        wait = self.share(key).budget.wait_s(self.clock())
        if wait:
            raise ServiceError(ErrorCode.DECODE_BUDGET_EXCEEDED,
                               f"session over its image decode budget ({self.rate:g} CPU s/s); retry in "
                               f"{wait:.2f}s", details={"retry_after_s": round(wait, 3)})

    async def run(self, key: Any, fn: Callable, *args: Any) -> Any:
        """fn(*args) in the pool within `key`'s slots and budget; its thread CPU time is charged to `key`."""
        share = self.share(key)
        self.check(key)
        async with share.slots:
            self.check(key)
            result, cpu, exc = await asyncio.get_running_loop().run_in_executor(self.pool, _timed, fn, args)
            share.budget.charge(cpu, self.clock())
            share.cpu_s += cpu
        if exc is not None:
            raise exc
        return result
