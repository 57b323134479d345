"""The off-path graph step after each placed window, written once as a generator of operations (sans I/O): the
session worker (serve_app/deployments/session_worker.py `_graph_step`) runs them with awaits (the solve in its
thread pool without the session's lock, the loop windows through the model deployment), `run_graph_step` runs
them synchronously for in-process drivers (bench/accuracy.py, the loop tests)."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

# The operations `graph_step` yields, and what it expects sent back:
#   ("locked", fn, *args)  fn(*args) under the session's lock (the worker: in its pool) -> fn's result
#   ("solve", job)         rec.consistency.run_job(job, rec.graph_params), WITHOUT the lock (the next window
#                          integrates meanwhile) -> the poses
#   ("publish", corr)      hand the correction to the store and the streams -> None
#   ("loops", plans)       these loop windows through the model in one call, each verified (integrate_loop)
#                          -> their reports
Op = tuple


def graph_step(rec, batch_loops: bool = True) -> Generator[Op, Any, None]:
    """graph_prepare -> solve -> graph_apply (a correction to publish) -> maintain when due; then every loop
    candidate due, up to loop_batch per model call; if any was accepted, again: ONE global solve for all the loops
    of a batch (a solve per loop made 228 global solves on the three-loop bench, batched 60). `batch_loops=False`
    is the order before loop batching: one loop window per call, stop after it."""
    while True:
        job = yield ("locked", rec.graph_prepare)
        if job is not None:
            poses = yield ("solve", job)
            corr = yield ("locked", rec.graph_apply, job, poses)
            if corr is not None:
                yield ("publish", corr)
            if rec.maintenance_due:
                yield ("locked", rec.maintain)
        accepted = 0
        ask = ("locked", rec.next_loops) if batch_loops else ("locked", rec.next_loops, 1)
        while plans := (yield ask):
            reports = yield ("loops", plans)
            accepted += sum(bool(r.get("accepted")) for r in reports)
            if not batch_loops:
                break
        if not accepted:
            return


@dataclass
class GraphStepLog:
    """What the steps did, accumulated over calls: solve kinds in order, the corrections, loop windows per model
    call, the loop reports, and CPU seconds of the solves, the loop forwards and their verification."""
    kinds: list[str] = field(default_factory=list)
    corrections: list = field(default_factory=list)
    loop_batches: list[int] = field(default_factory=list)
    reports: list[dict] = field(default_factory=list)
    solve_cpu_s: float = 0.0
    loop_forward_cpu_s: float = 0.0
    loop_verify_cpu_s: float = 0.0


def run_graph_step(rec, forward_windows: Callable[[list], list], log: GraphStepLog | None = None,
                   batch_loops: bool = True, tag: str = "graph") -> GraphStepLog:
    """`graph_step` run synchronously, the loop windows through `forward_windows` (requests -> predictions)."""
    log = log if log is not None else GraphStepLog()
    steps = graph_step(rec, batch_loops)
    result = None
    while True:
        try:
            op = steps.send(result)
        except StopIteration:
            return log
        kind, args = op[0], op[1:]
        c0 = time.process_time()
        if kind == "locked":
            result = args[0](*args[1:])
        elif kind == "solve":
            log.kinds.append(args[0].kind)
            result = rec.consistency.run_job(args[0], rec.graph_params)
            log.solve_cpu_s += time.process_time() - c0
        elif kind == "publish":
            log.corrections.append(args[0])
            result = None
        else:  # "loops"
            plans = args[0]
            log.loop_batches.append(len(plans))
            preds = forward_windows([p.request(tag=f"{tag}:loop{-p.window}") for p in plans])
            c1 = time.process_time()
            result = [rec.integrate_loop(plan, pred) for plan, pred in zip(plans, preds)]
            log.reports.extend(result)
            log.loop_forward_cpu_s += c1 - c0
            log.loop_verify_cpu_s += time.process_time() - c1
