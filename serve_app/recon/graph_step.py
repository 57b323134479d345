"""The off-path graph step, synchronously: what the session worker's `_graph_step`
(serve_app/deployments/session_worker.py) does after each placed window, for in-process drivers (bench/accuracy.py,
the loop tests). The worker runs the same order with awaits (the solve in its thread pool, the loop windows through
the model deployment); keep the two in step."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


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
    """graph_prepare -> solve -> graph_apply -> maintain when due; then every loop candidate due, up to loop_batch
    per `forward_windows` call -> integrate_loop; if any was accepted, again (one global solve per batch of loops).
    `batch_loops=False` is the order before loop batching: one loop window per call, stop after a rejected one."""
    log = log if log is not None else GraphStepLog()
    while True:
        job = rec.graph_prepare()
        if job is not None:
            log.kinds.append(job.kind)
            c0 = time.process_time()
            poses = rec.consistency.run_job(job, rec.graph_params)
            log.solve_cpu_s += time.process_time() - c0
            corr = rec.graph_apply(job, poses)
            if corr is not None:
                log.corrections.append(corr)
            if rec.maintenance_due:
                rec.maintain()
        accepted = 0
        while plans := (rec.next_loops() if batch_loops else rec.next_loops(1)):
            log.loop_batches.append(len(plans))
            c0 = time.process_time()
            preds = forward_windows([p.request(tag=f"{tag}:loop{-p.window}") for p in plans])
            c1 = time.process_time()
            for plan, pred in zip(plans, preds):
                log.reports.append(rec.integrate_loop(plan, pred))
                accepted += bool(log.reports[-1].get("accepted"))
            log.loop_forward_cpu_s += c1 - c0
            log.loop_verify_cpu_s += time.process_time() - c1
            if not batch_loops:
                break
        if not accepted:
            return log
