"""Global consistency of one session's map: the window pose graph, loop closure and per-window corrections.

Owned by StreamReconstructor when SessionParams.global_consistency is on. Pure numpy; the session worker calls
the steps in this order (docs/ARCHITECTURE.md "Global consistency"):

1. `record_window` (inside integrate, cheap): a node per placed window, its odometry observations (the context
   frames' points in both gauges), its keyframes for loop retrieval.
2. `prepare` (pool, under the worker's lock, a few ms): odometry edges fitted per earlier window (one robust
   Sim(3) each: a window whose context frames come from two windows gets two edges, the sliding graph's
   redundancy), loop retrieval, and a solve job: the newest `graph_local_windows` nodes after an ordinary
   window, the whole graph after accepted loops (the worker verifies every loop candidate due first, so one
   global solve covers a batch of loops).
3. `run_job` (pool, without the lock: integration of the next window goes on meanwhile): the solve.
4. `apply` (pool, under the lock): new node poses -> corrections. Windows integrated while the job ran follow
   the newest solved node rigidly. Returns {window: delta Sim3} for the reconstructor to move its world frames
   and the absolute per-window transforms for the `correction` message.

Node poses are the windows' gauges normalised to median depth 1 (gauge -> world). A window's correction is
C_k = N_k ∘ E_k^-1, E_k its node as first emitted: points as first emitted map to the corrected world by C_k.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serve_app.recon.alignment import robust_scale_translation, robust_sim3
from serve_app.recon.geometry import Sim3, orthonormalize
from serve_app.recon.loops import Keyframe, LoopDetector
from serve_app.recon.posegraph import Edge, GraphParams, PoseGraph, solve

CORRECTION_EPS = 1e-5  # a window's transform changed: rotation (rad), log scale, translation (x its depth)
ODOM_MAX_POINTS = 2000


def rotation_deg(R: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(R) - 1) / 2, -1, 1))))


def scale_sim(d: float) -> Sim3:
    return Sim3(float(d), np.eye(3), np.zeros(3))


def sim_distance(a: Sim3, b: Sim3) -> float:
    """Largest of the rotation angle, |log scale| and translation difference (world units) between a and b."""
    rel = a.compose(b.inverse())
    ang = float(np.arccos(np.clip((np.trace(rel.R) - 1) / 2, -1, 1)))
    return max(ang, abs(float(np.log(rel.s))), float(np.abs(a.t - b.t).max()))


@dataclass
class SolveJob:
    ids: list[int]
    poses: list[Sim3]
    edges: list[Edge]
    fixed: list[int]
    newest: int  # newest node when the job was prepared
    kind: str  # "local" | "global"


@dataclass
class Consistency:
    params: Any  # SessionParams
    graph: PoseGraph = None  # type: ignore[assignment]
    emitted: dict[int, Sim3] = field(default_factory=dict)  # node as first emitted
    depth: dict[int, float] = field(default_factory=dict)  # window -> gauge median depth (normalisation)
    observations: list[tuple] = field(default_factory=list)
    new_keyframes: list[Keyframe] = field(default_factory=list)
    detector: LoopDetector = None  # type: ignore[assignment]
    loops_accepted: int = 0
    loops_rejected: int = 0
    loop_due: bool = False  # a loop was accepted since the last global solve
    version: int = 0

    def __post_init__(self):
        p = self.params
        if self.graph is None:
            self.graph = PoseGraph(GraphParams(sigma_rot_deg=p.graph_sigma_rot_deg, sigma_trans=p.graph_sigma_trans,
                                               sigma_scale=p.graph_sigma_scale))
        if self.detector is None:
            self.detector = LoopDetector(p.loop_min_similarity, p.loop_min_gap, p.loop_query_interval,
                                         p.loop_max_keyframes)

    # --- 1. during integration ------------------------------------------------------------------------
    def record_window(self, window: int, placement: Sim3, depth: float,
                      observations: list[tuple]) -> Sim3:
        """A placed window: placement = its gauge -> world; observations = (earlier window, points in this
        window's gauge, the same points in that window's normalised gauge, weights, the rotation between the two
        gauges from that frame's cameras). Returns the node."""
        node = placement.compose(scale_sim(depth))
        self.graph.add_node(window, node)
        self.emitted[window] = node
        self.depth[window] = float(depth)
        for owner, src, dst, w, rot in observations:
            if owner in self.graph.nodes and owner != window:
                self.observations.append((owner, window, np.asarray(src, np.float32) / np.float32(depth), dst, w,
                                          rot))
        return node

    def correction(self, window: int) -> Sim3:
        if window not in self.graph.nodes:
            return Sim3.identity()
        return self.graph.nodes[window].compose(self.emitted[window].inverse())

    # --- 2. after the window's commit, under the lock ---------------------------------------------------
    def prepare(self) -> SolveJob | None:
        """Odometry edges from the recorded observations, loop retrieval; the solve job (None: nothing to do)."""
        added = 0
        by_pair: dict[tuple[int, int], list] = {}
        for owner, win, src, dst, w, rot in self.observations:
            by_pair.setdefault((owner, win), []).append((src, dst, w, rot))
        self.observations = []
        for (owner, win), parts in by_pair.items():
            src = np.concatenate([p[0] for p in parts])
            dst = np.concatenate([p[1] for p in parts])
            w = np.concatenate([p[2] for p in parts])
            res = robust_sim3(src, dst, w, max_points=ODOM_MAX_POINTS, seed=win)
            if res.ok:
                R = orthonormalize(np.sum([p[3] for p in parts], axis=0))  # rotation from the cameras (see
                if rotation_deg(R.T @ res.sim3.R) <= 10.0:  # StreamReconstructor._dense_alignment)
                    fit = robust_scale_translation(src, dst, R, w)
                    if fit.ok:
                        res = fit
                # Weight: more and tighter correspondences, more trust (relative to a typical window's).
                weight = float(np.clip(res.inlier_ratio * min(res.num_points, ODOM_MAX_POINTS) / ODOM_MAX_POINTS,
                                       0.05, 1.0))
                self.graph.add_edge(Edge(owner, win, res.sim3, "odom", weight))
                added += 1
        for kf in self.new_keyframes:
            self.detector.add(kf)
        self.new_keyframes = []
        ids = sorted(self.graph.nodes)
        if len(ids) < 2:
            return None
        if self.loop_due:
            self.loop_due = False
            return SolveJob(ids, [self.graph.nodes[i] for i in ids], list(self.graph.edges), [ids[0]], ids[-1],
                            "global")
        if not added:
            return None
        free = set(ids[-self.params.graph_local_windows:])
        edges = [e for e in self.graph.edges if e.a in free or e.b in free]
        used = sorted({e.a for e in edges} | {e.b for e in edges} | free)
        fixed = [i for i in used if i not in free]
        if not fixed:
            fixed = [used[0]]
        return SolveJob(used, [self.graph.nodes[i] for i in used], edges, fixed, ids[-1], "local")

    # --- 3. without the lock ------------------------------------------------------------------------------
    @staticmethod
    def run_job(job: SolveJob, params: GraphParams) -> dict[int, Sim3]:
        return solve(job.ids, job.poses, job.edges, params, fixed=job.fixed).poses

    # --- 4. under the lock ----------------------------------------------------------------------------------
    def apply(self, job: SolveJob, poses: dict[int, Sim3]) -> tuple[dict[int, Sim3], dict[int, Sim3]]:
        """Take the solution: ({window: delta to apply to what the reconstructor holds of it},
        {window: absolute correction} for windows whose correction changed)."""
        deltas: dict[int, Sim3] = {}
        for k, new in poses.items():
            old = self.graph.nodes.get(k)
            if old is None:
                continue
            d = new.compose(old.inverse())
            if sim_distance(new, old) > CORRECTION_EPS:
                deltas[k] = d
                self.graph.nodes[k] = new
        last = job.newest
        follow = deltas.get(last)
        if follow is not None:  # windows placed while the job ran were placed against the old world
            for k in [k for k in self.graph.nodes if k > last]:
                self.graph.nodes[k] = follow.compose(self.graph.nodes[k])
                deltas[k] = follow
        if deltas:
            self.version += 1
        return deltas, {k: self.correction(k) for k in deltas}

    # --- loops --------------------------------------------------------------------------------------------
    def accept_loop(self, query_window: int, cand_window: int, z: Sim3) -> tuple[bool, str | None, float]:
        """The last test of a verified loop (agreement with the graph), and its edge if it passes."""
        # Weighted above an odometry edge (loop_edge_weight): the chain's edges share their windows' depth errors,
        # so it resists a closure more than its real drift warrants (bench/README.md "Loop edges at the cameras").
        edge = Edge(cand_window, query_window, z, "loop", float(self.params.loop_edge_weight))
        steps = max(abs(query_window - cand_window), 1)
        disc = self.graph.loop_discrepancy(edge, steps)
        if disc > self.params.loop_max_discrepancy:
            self.loops_rejected += 1
            return False, f"disagrees with the pose graph ({disc:.1f} > {self.params.loop_max_discrepancy})", disc
        self.graph.add_edge(edge)
        self.loops_accepted += 1
        self.loop_due = True
        return True, None, disc

    # --- snapshot -------------------------------------------------------------------------------------------
    def state(self) -> dict:
        """The graph and counters (the loop keyframes travel apart: StreamReconstructor.snapshot, loop_snapshot)."""
        return {"graph": self.graph.state(), "emitted": dict(self.emitted), "depth": dict(self.depth),
                "loops_accepted": self.loops_accepted, "loops_rejected": self.loops_rejected,
                "version": self.version}

    @classmethod
    def from_state(cls, params, st: dict) -> Consistency:
        c = cls(params, graph=PoseGraph.from_state(st["graph"]))
        c.emitted, c.depth = dict(st["emitted"]), dict(st["depth"])
        c.loops_accepted, c.loops_rejected, c.version = st["loops_accepted"], st["loops_rejected"], st["version"]
        return c
