"""The Ingress deployment: the state one replica holds, composed of the rooms in serve_app/ingress/ (routes,
stream, results, one-shot upload, worker ownership). Never blocks its event loop: image decoding, resizing,
geometry and export encoding run in a thread pool. The FastAPI app comes from serve_app/ingress/app.py's
factory, built by each replica from its args (`__serve_build_asgi_app__`)."""


import asyncio
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cv2
import torch
from fastapi import Request, WebSocket
from ray import serve

from serve_app.config import AppArgs
from serve_app.deployments.session_actor import get_session_shards
from serve_app.deployments.session_worker import SessionWorker
from serve_app.ingress.app import make_api
from serve_app.ingress.auth import AccessPolicy, bearer_token
from serve_app.ingress.connection import Connection
from serve_app.ingress.oneshot import OneShotUpload
from serve_app.ingress.results import ResultStreaming
from serve_app.ingress.routes import ExportRoutes, SessionRoutes, StatusRoutes
from serve_app.ingress.stream import StreamRoute
from serve_app.ingress.workers import WorkerOwnership
from serve_app.media.decode_pool import DecodeGate
from serve_app.media.imaging import ImageLimits
from serve_app.media.video import VideoLimits
from serve_app.observability.metrics import IngressMetrics
from serve_app.observability.status_cache import CachedCall
from serve_app.recon import posegraph
from serve_app.sessions.admission import ConcurrencyGate

log = logging.getLogger("ray.serve.da3.ingress")  # child of ray.serve: goes to the replica log files


def _warm_up_pose_graph() -> None:
    try:
        log.info("pose-graph kernels ready in %.1f s", posegraph.warm_up())
    except Exception:  # global consistency then compiles at its first solve; nothing else depends on it
        log.exception("pose-graph warm-up failed")


class IngressReplica(SessionRoutes, ExportRoutes, StatusRoutes, OneShotUpload, StreamRoute, ResultStreaming,
                     WorkerOwnership):
    def __init__(self, model, args: dict[str, Any]):
        self.args = AppArgs.model_validate(args)
        self.model = model
        # the session-store shards: a session's actor is self.store.of(its id) (serve_app/sessions/shards.py)
        self.store = get_session_shards(self.args.session_actor, self.args.limits)
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="da3-cpu")
        # Parallelism here comes from the pool; library thread pools on top would fight the model replica's
        # threads for the same cores (on a CPU box the model's forward ran ~2x slower).
        cv2.setNumThreads(1)
        torch.set_num_threads(1)
        self.workers: dict[str, SessionWorker] = {}
        self.worker_locks: dict[str, asyncio.Lock] = {}
        self.connections: set[Connection] = set()
        self.draining = False
        self.drain_watch: asyncio.Task | None = None
        self.errors: Counter[str] = Counter()
        self.frames_in = 0
        self.records_sent: Counter[str] = Counter()  # "local" (from this replica's worker) or "long_poll"
        self.metrics = IngressMetrics()
        self.streams = 0
        self.processed_closed = 0  # frames processed by workers that have since gone
        self.rate: list[tuple[float, int]] = []
        self.started = time.time()
        lim = self.args.limits
        self.image_limits = ImageLimits(max_bytes=lim.max_image_bytes, max_pixels=lim.max_image_pixels,
                                        allowed_formats=tuple(f.upper() for f in lim.allowed_formats),
                                        max_bit_depth=lim.max_image_bit_depth,
                                        max_decoded_bytes=lim.max_image_decoded_bytes)
        # Image decodes share self.pool fairly between sessions; videos decode in their own small pool.
        self.decode_gate = DecodeGate(self.pool, lim.decode_cpu_s_per_s, lim.decode_cpu_burst_s,
                                      lim.max_decode_slots_per_session)
        self.video_pool = ThreadPoolExecutor(max_workers=lim.video_decode_workers, thread_name_prefix="da3-video")
        # Open decoders hold reference frames: no more videos in decoding at once than the pool has threads.
        self.video_slots = asyncio.Semaphore(lim.video_decode_workers)
        self.video_limits = VideoLimits(max_pixels=lim.max_image_pixels,
                                        max_decoded_frames=lim.max_video_decoded_frames,
                                        max_decoded_bytes=lim.max_video_decoded_bytes,
                                        max_decode_s=lim.max_video_decode_s)
        self.policy = AccessPolicy(self.args.auth, self.args.cors_origins)
        self.export_gate = ConcurrencyGate(lim.max_concurrent_exports)
        # serve.status() is a blocking controller call: made in a thread, reused for stats_cache_s.
        self.deployment_status = CachedCall(self._deployment_status, lim.stats_cache_s, default={})
        # The pose graph's numba kernels: loaded (compiled, the first time on a machine) in the pool now, so no
        # session's first global solve waits for them.
        self.pool.submit(_warm_up_pose_graph)

    def _count_error(self, code: str, session_id: str | None = None) -> None:
        if session_id:
            log.info("session %s: %s", session_id, code, extra={"session_id": session_id, "code": code})
        self.errors[code] += 1
        self.metrics.errors.inc(tags={"code": code})

    def _owner(self, token: str | None) -> str | None:
        return self.policy.owner(token)

    @staticmethod
    def _bearer(request: Request | WebSocket) -> str | None:
        # Authorization header, or (browsers cannot set WebSocket headers) a "bearer.<key>" subprotocol.
        return bearer_token(request.headers)

    def __serve_build_asgi_app__(self):
        """Serve asks each replica for its app after __init__: built from this replica's args, routes bound to it."""
        return make_api(self, self.args, self.policy)


# Late-bound ingress (`serve.ingress()` without an app): the app is built in the replica, not pickled with the class.
Ingress = serve.deployment(
    name="Ingress",
    max_ongoing_requests=2000,  # every open WebSocket holds one slot for its whole life
    ray_actor_options={"num_cpus": 1},
    graceful_shutdown_timeout_s=10,
    graceful_shutdown_wait_loop_s=1,
)(serve.ingress()(IngressReplica))
