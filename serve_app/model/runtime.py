"""DA3 network runtime: batched, mixed-precision forwards of view windows (no Ray here)."""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Iterable
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

from serve_app.errors import ErrorCode, ServiceError
from serve_app.model.checkpoint import ANY_VIEW_MODELS, METRIC_MODELS, load_network, resolve_checkpoint
from serve_app.model.preprocess import PATCH_SIZE, normalize_images
from serve_app.prediction import WindowPrediction, WindowRequest

logger = logging.getLogger(__name__)

AMP_MODES = ("auto", "bf16", "fp16", "fp32")
REF_VIEW_STRATEGIES = ("first", "middle", "saddle_balanced", "saddle_sim_range")
METRIC_FOCAL_DIVISOR = 300.0  # da3metric-large: metric depth = focal * output / 300 (DA3's rule)
DEFAULT_FOV_DEG = 60.0  # field of view assumed on the long side by models without a camera head
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "cudagraphs")


def compiled_graph_count() -> int:
    """Graphs torch.compile has produced in this process so far (grows by at least one per recompilation)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _rigid_inverse(T: torch.Tensor) -> torch.Tensor:
    """Inverse of (..., 4, 4) rigid transforms."""
    R = T[..., :3, :3]
    t = T[..., :3, 3:]
    out = torch.zeros_like(T)
    out[..., :3, :3] = R.mT
    out[..., :3, 3:] = -R.mT @ t
    out[..., 3, 3] = 1.0
    return out


def normalize_prior_extrinsics(w2c: torch.Tensor) -> torch.Tensor:
    """DA3's prior normalisation, per window: (B, N, 4, 4) w2c relative to the first view, translations
    divided by the median camera distance (at least 0.1)."""
    rel = w2c @ _rigid_inverse(w2c[:, :1])
    dists = _rigid_inverse(rel)[..., :3, 3].norm(dim=-1)  # (B, N) camera centres in view-0 frame
    median = dists.median(dim=-1).values.clamp(min=0.1)
    rel = rel.clone()
    rel[..., :3, 3] = rel[..., :3, 3] / median[:, None, None]
    return rel


def default_intrinsics(height: int, width: int, n: int) -> np.ndarray:
    """(n, 3, 3) pinhole guess (DEFAULT_FOV_DEG on the long side) for models that predict no camera."""
    f = 0.5 * max(height, width) / math.tan(math.radians(DEFAULT_FOV_DEG) / 2)
    K = np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]], dtype=np.float32)
    return np.repeat(K[None], n, axis=0)


def _submodule(net: nn.Module, name: str) -> nn.Module | None:
    # The nested model keeps its any-view network as `.da3`.
    for module in (net, getattr(net, "da3", None)):
        if module is not None and getattr(module, name, None) is not None:
            return getattr(module, name)
    return None


class DA3Runtime:
    """One DA3 network on one device.

    Priors: request extrinsics (N, 4, 4 w2c) are normalised as DA3's api does (relative to the first view,
    translations divided by the median camera distance) and, with the intrinsics, condition the network.
    Outputs always stay in the network's own gauge (first-view / reference frame, network scale): aligning
    them to the priors' world is the caller's job. Intrinsics are the network's prediction where it has a
    camera head; otherwise the prior intrinsics or a DEFAULT_FOV_DEG guess, with identity extrinsics when no
    prior is given.
    """

    def __init__(self, checkpoint: str, *, model_name: str | None = None, device: str | None = None,
                 amp: str = "auto", ref_view_strategy: str = "saddle_balanced", compile: bool = False,
                 cache_dir: str | None = None, local_files_only: bool | None = None,
                 max_batch: int | None = None, compile_backend: str = "inductor"):
        if amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
        if ref_view_strategy not in REF_VIEW_STRATEGIES:
            raise ValueError(f"ref_view_strategy must be one of {REF_VIEW_STRATEGIES}, got {ref_view_strategy!r}")
        if compile_backend not in COMPILE_BACKENDS:
            raise ValueError(f"compile_backend must be one of {COMPILE_BACKENDS}, got {compile_backend!r}")
        self.resolved = resolve_checkpoint(checkpoint, model_name=model_name, cache_dir=cache_dir,
                                           local_files_only=local_files_only)
        self.model_name = self.resolved.model_name
        self.any_view = self.model_name in ANY_VIEW_MODELS
        self.is_metric = self.model_name in METRIC_MODELS
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.amp_dtype = self._amp_dtype(amp, self.device)
        self.ref_view_strategy = ref_view_strategy
        self.compiled = bool(compile)
        self.compile_backend = compile_backend if compile else None
        self.warmed: list[tuple[int, int, int, int, bool]] = []  # (batch, views, h, w, priors) run once
        self.warmup_s = 0.0
        self.max_batch = max_batch if self.any_view else 1

        t0 = time.perf_counter()
        self.net = load_network(self.resolved).to(self.device).eval()
        self.load_s = time.perf_counter() - t0
        self.has_camera_head = _submodule(self.net, "cam_dec") is not None
        self.accepts_priors = _submodule(self.net, "cam_enc") is not None
        # Per-view global descriptors for loop retrieval from the forward that runs anyway (no second network):
        # the last backbone layer's patch tokens, averaged per view, captured by a hook (eager only: a compiled
        # graph gives none, and the reconstructor falls back to an image thumbnail).
        self._desc: torch.Tensor | None = None
        backbone = None if compile else _submodule(self.net, "backbone")
        if backbone is not None:
            backbone.register_forward_hook(self._capture_descriptors)
        # Static shapes: one graph per warmed (batch, views, h, w[, priors]) and no recompilation in steady
        # state (dynamic shapes would recompile on the second shape seen, then run a slower generic graph).
        self._forward = torch.compile(self.net, backend=compile_backend, dynamic=False) if compile else self.net
        if compile:
            # DA3's RoPE calls Tensor.item(); capturing it keeps that in the graph instead of splitting it there
            # (H200, da3-small, 6x378x504, batch 1: compiled 1.35x eager with it, 1.23x without; bench/gpu.py).
            import torch._dynamo as dynamo

            dynamo.config.capture_scalar_outputs = True
        logger.info("DA3Runtime: %s from %s on %s (amp=%s) loaded in %.1fs", self.model_name,
                    self.resolved.source, self.device, self.amp_dtype, self.load_s)

    @staticmethod
    def _amp_dtype(amp: str, device: torch.device) -> torch.dtype:
        if amp == "fp32":
            return torch.float32
        if amp == "bf16":
            return torch.bfloat16
        if amp == "fp16":
            return torch.float16
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def info(self) -> dict:
        return {
            "model_name": self.model_name,
            "checkpoint": self.resolved.spec,
            "source": self.resolved.source,
            "directory": str(self.resolved.directory) if self.resolved.directory else None,
            "any_view": self.any_view,
            "is_metric": self.is_metric,
            "device": str(self.device),
            "amp": str(self.amp_dtype).removeprefix("torch."),
            "ref_view_strategy": self.ref_view_strategy,
            "compile": self.compiled,
            "compiled": self.compiled,
            "compile_backend": self.compile_backend,
            "warmup_s": round(self.warmup_s, 3),
            "warmed_shapes": [list(x) for x in self.warmed],
            "has_camera_head": self.has_camera_head,
            "parameters": sum(p.numel() for p in self.net.parameters()),
            "load_s": round(self.load_s, 3),
        }

    # ------------------------------------------------------------------------------------------

    @staticmethod
    def _validate(req: WindowRequest) -> None:
        img = req.images
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 4 or img.shape[-1] != 3:
            raise ValueError(f"window {req.tag!r}: images must be uint8 (N, H, W, 3), got "
                             f"{getattr(img, 'dtype', type(img))} {getattr(img, 'shape', '')}")
        n, h, w = img.shape[:3]
        if n < 1 or h % PATCH_SIZE or w % PATCH_SIZE or h == 0 or w == 0:
            raise ValueError(f"window {req.tag!r}: need N>=1 views with sides multiples of {PATCH_SIZE}, "
                             f"got {img.shape}")
        if req.extrinsics is not None and np.shape(req.extrinsics) != (n, 4, 4):
            raise ValueError(f"window {req.tag!r}: extrinsics must be ({n}, 4, 4), got {np.shape(req.extrinsics)}")
        if req.intrinsics is not None and np.shape(req.intrinsics) != (n, 3, 3):
            raise ValueError(f"window {req.tag!r}: intrinsics must be ({n}, 3, 3), got {np.shape(req.intrinsics)}")
        if req.extrinsics is not None and req.intrinsics is None:
            raise ValueError(f"window {req.tag!r}: extrinsics priors need intrinsics priors too")

    def _stack_to_device(self, arrays: list[np.ndarray], dtype=None) -> torch.Tensor:
        """Stack on the host straight into pinned memory (one copy, no fresh pages to fault in), then an async
        copy to the GPU. PyTorch keeps the pinned block until that copy is done."""
        first = np.asarray(arrays[0])
        dtype = np.dtype(dtype or first.dtype)
        if self.device.type != "cuda":
            return torch.from_numpy(np.stack(arrays).astype(dtype, copy=False)).to(self.device)
        host = torch.empty((len(arrays), *first.shape), dtype=torch.from_numpy(np.empty(0, dtype)).dtype,
                           pin_memory=True)
        np.stack(arrays, out=host.numpy())
        return host.to(self.device, non_blocking=True)

    def _fetch(self, tensors: list[torch.Tensor | None]) -> list[np.ndarray | None]:
        """Device -> host into pinned buffers with one sync: measured on an H200 at 50 GB/s against 14 GB/s
        for .cpu(), whose fresh pageable memory also page-faults on every call (bench/gpu.py section 3)."""
        if self.device.type != "cuda":
            return [None if t is None else t.numpy() for t in tensors]
        hosts = []
        for t in tensors:
            if t is None:
                hosts.append(None)
                continue
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            hosts.append(host)
        self._sync()
        return [None if h is None else h.numpy() for h in hosts]

    def _autocast(self):
        if self.amp_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _capture_descriptors(self, module, args, output) -> None:
        try:
            tokens = output[0][-1][0]  # (B, N, patches, C) of the last layer the heads read
            self._desc = torch.nn.functional.normalize(tokens.float().mean(dim=2), dim=-1)
        except (IndexError, TypeError, AttributeError):  # another backbone layout: no descriptors
            self._desc = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def forward_windows(self, requests: list[WindowRequest]) -> list[WindowPrediction]:
        """Predict every window; results in request order, views in each window's input order.

        Windows with the same `shape_key` share one (B, N, 3, H, W) forward on any-view models; other
        models run one window at a time (their outputs couple the batch).
        """
        for req in requests:
            self._validate(req)
        groups: OrderedDict[tuple, list[int]] = OrderedDict()
        for i, req in enumerate(requests):
            groups.setdefault(req.shape_key, []).append(i)

        results: list[WindowPrediction | None] = [None] * len(requests)
        limit = self.max_batch or len(requests)
        for indices in groups.values():
            for start in range(0, len(indices), limit):
                chunk = indices[start:start + limit]
                for i, pred in zip(chunk, self._forward_group([requests[i] for i in chunk])):
                    results[i] = pred
        return results  # type: ignore[return-value]

    def _forward_group(self, reqs: list[WindowRequest]) -> list[WindowPrediction]:
        B = len(reqs)
        N, H, W = reqs[0].images.shape[:3]
        t_start = time.perf_counter()
        with torch.inference_mode():
            images = normalize_images(self._stack_to_device([r.images for r in reqs]))
            ext = ixt = None
            if reqs[0].extrinsics is not None and self.accepts_priors:
                ext = normalize_prior_extrinsics(self._stack_to_device([r.extrinsics for r in reqs], np.float32))
                ixt = self._stack_to_device([r.intrinsics for r in reqs], np.float32)
            self._sync()
            t0 = time.perf_counter()
            self._desc = None
            with self._autocast():
                out = self._forward(images, ext, ixt, [], False, False, self.ref_view_strategy)
            self._sync()
            t1 = time.perf_counter()

            depth = out["depth"].float().reshape(B, N, H, W)
            conf = out["depth_conf"].float() if "depth_conf" in out else torch.ones_like(depth)
            extr = out["extrinsics"][..., :3, :4].float() if "extrinsics" in out else None
            intr = out["intrinsics"].float() if "intrinsics" in out else None
            desc = self._desc if self._desc is not None and tuple(self._desc.shape[:2]) == (B, N) else None
            depth_np, conf_np, extr_np, intr_np, desc_np = self._fetch([depth, conf.reshape(B, N, H, W), extr, intr,
                                                                        desc])
            t2 = time.perf_counter()

        preds = []
        for b, req in enumerate(reqs):
            if intr_np is not None:
                K = intr_np[b]
            elif req.intrinsics is not None:
                K = np.asarray(req.intrinsics, dtype=np.float32)
            else:
                K = default_intrinsics(H, W, N)
            if extr_np is not None:
                E = extr_np[b]
            elif req.extrinsics is not None:
                E = np.asarray(req.extrinsics, dtype=np.float32)[:, :3, :4]
            else:
                E = np.repeat(np.eye(4, dtype=np.float32)[None, :3], N, axis=0)
            d = depth_np[b]
            if self.model_name == "da3metric-large":
                focal = 0.5 * (K[:, 0, 0] + K[:, 1, 1])
                d = d * (focal[:, None, None] / METRIC_FOCAL_DIVISOR)
            preds.append(WindowPrediction(
                depth=np.ascontiguousarray(d, dtype=np.float32),
                conf=np.ascontiguousarray(conf_np[b], dtype=np.float32),
                extrinsics=np.ascontiguousarray(E, dtype=np.float32),
                intrinsics=np.ascontiguousarray(K, dtype=np.float32),
                images=req.images,
                is_metric=self.is_metric,
                descriptors=None if desc_np is None else np.ascontiguousarray(desc_np[b], dtype=np.float32),
            ))
        # Stages of this forward call (shared by its windows): host->device, network, device->host, numpy.
        timings = {"prep_ms": (t0 - t_start) * 1000.0, "model_ms": (t1 - t0) * 1000.0,
                   "fetch_ms": (t2 - t1) * 1000.0, "post_ms": (time.perf_counter() - t2) * 1000.0,
                   "batch_size": float(B)}
        for pred in preds:
            pred.timings = dict(timings)
        return preds

    # ------------------------------------------------------------------------------------------

    def health_check(self, views: int = 2, size: tuple[int, int] = (56, 56)) -> dict:
        """A tiny forward; raises ServiceError(MODEL_UNAVAILABLE) if the model cannot run. A compiled runtime
        that has been warmed up checks on its smallest warmed shape instead, so it never compiles a new graph."""
        h, w = size
        if self.compiled and self.warmed:
            _, views, h, w, _ = min(self.warmed)
        rng = np.random.default_rng(0)
        req = WindowRequest(images=rng.integers(0, 256, (views, h, w, 3), dtype=np.uint8), tag="health")
        try:
            pred = self.forward_windows([req])[0]
        except Exception as exc:
            raise ServiceError(ErrorCode.MODEL_UNAVAILABLE,
                               f"{self.model_name} failed its health check on {self.device}: {exc}",
                               fatal=True) from exc
        if pred.depth.shape != (views, h, w) or not np.isfinite(pred.depth).all():
            raise ServiceError(ErrorCode.MODEL_UNAVAILABLE,
                               f"{self.model_name} health check gave bad depth "
                               f"{pred.depth.shape} (finite: {bool(np.isfinite(pred.depth).all())})",
                               fatal=True)
        return {"ok": True, "model_ms": pred.timings["model_ms"]}

    def warmup(self, sizes: Iterable[tuple[int, int]], views: int = 2, batch: int = 1) -> None:
        """Run one forward per (h, w) so kernels/compiled graphs are ready before traffic."""
        for h, w in sizes:
            imgs = np.zeros((views, h, w, 3), dtype=np.uint8)
            self.forward_windows([WindowRequest(images=imgs, tag="warmup") for _ in range(batch)])

    def warmup_shapes(self, shapes: Iterable[tuple[int, int, int]], batch_sizes: Iterable[int],
                      priors: bool = False) -> float:
        """Forward every (views, h, w) window shape at every batch size (and, with `priors`, again with pose
        and intrinsics priors when the network takes them) that has not been run yet, so a compiled runtime
        has all its graphs before traffic. Returns the seconds spent (also added to `warmup_s`)."""
        shapes = [tuple(int(x) for x in s) for s in shapes]
        sizes = sorted({int(b) for b in batch_sizes if int(b) >= 1})
        if not self.any_view:
            sizes = [1] if sizes else []  # single-view models run one window per forward anyway
        variants = [False, True] if priors and self.accepts_priors else [False]
        todo = [(b, n, h, w, p) for (n, h, w) in shapes for b in sizes for p in variants
                if (b, n, h, w, p) not in self.warmed]
        if not todo:
            return 0.0
        if self.compiled:
            # Each static shape is its own graph; keep dynamo from falling back to eager past its default limit.
            import torch._dynamo.config as dynamo_config

            need = len(self.warmed) + len(todo) + 4
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, need)
            dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4 * need)
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        for b, n, h, w, p in todo:
            t1 = time.perf_counter()
            reqs = []
            for _ in range(b):
                ext = ixt = None
                if p:
                    ixt = default_intrinsics(h, w, n)
                    ext = np.repeat(np.eye(4, dtype=np.float32)[None], n, axis=0)
                    ext[:, 0, 3] = np.arange(n, dtype=np.float32) * 0.1
                reqs.append(WindowRequest(images=rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8),
                                          extrinsics=ext, intrinsics=ixt, tag="warmup"))
            # Twice: DA3's RoPE keeps Python-side caches keyed by the token grid, so the first forward at a new
            # grid traces the cache-miss branch and steady state takes the cache-hit branch (its own graph).
            self.forward_windows(reqs)
            if self.compiled:
                self.forward_windows(reqs)
            self.warmed.append((b, n, h, w, p))
            logger.info("DA3Runtime warm-up: batch %d x %d views %dx%d%s in %.1fs", b, n, h, w,
                        " with priors" if p else "", time.perf_counter() - t1)
        elapsed = time.perf_counter() - t0
        self.warmup_s += elapsed
        logger.info("DA3Runtime warm-up (%s): %d shape(s) in %.1fs", self.compile_backend or "eager", len(todo),
                    elapsed)
        return elapsed
