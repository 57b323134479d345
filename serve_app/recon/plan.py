"""The types a session's reconstruction passes between planning, the model and integration: the frames it
accepted, the world frames later windows align to, a window's plan and its output."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from serve_app.prediction import WindowRequest
from serve_app.recon.geometry import finite_rows, invert_pose, sample_indices

ALIGN_POINTS_PER_FRAME = 4000  # world samples a frame keeps for aligning later windows (not its whole depth map)


def world_part_key(index: int) -> str:
    """The snapshot item (sessions/stream_state.py) that holds a world frame's unchanging parts; loop keyframes'
    items are keyed by their int frame index."""
    return f"w{index}"


def is_world_part_key(key: Any) -> bool:
    return isinstance(key, str) and key.startswith("w")


@dataclass
class FrameInput:
    index: int  # server frame index (acceptance order)
    frame_id: Any  # client's id (defaults to index)
    image: np.ndarray  # (h, w, 3) uint8, model input size
    original_size: tuple[int, int]  # (W, H) as received
    received_at: float = field(default_factory=time.time)
    timestamp: float | None = None
    intrinsics: np.ndarray | None = None  # prior, processed pixels
    pose: np.ndarray | None = None  # prior c2w
    # The image as the client encoded it (2-8x smaller than the decoded array for JPEGs). The copy kept in the
    # session store and the world frames of a snapshot carry only this (image=None); another replica taking the
    # session over decodes it again.
    encoded: bytes | None = None


@dataclass
class WorldFrame:
    """A processed frame that later windows may use as context. Of its depth map only a sample of confident
    pixels is kept, in world coordinates: aligning a window needs thousands of correspondences, not 190k per
    frame, and the session snapshot carries these after every window."""

    index: int
    frame_id: Any
    image: np.ndarray
    pix: np.ndarray  # (k,) int32 flat row-major pixel indices into the model-size image
    points: np.ndarray  # (k, 3) float32 world points at pix
    conf: np.ndarray  # (k,) float32 confidence at pix
    c2w: np.ndarray  # (4, 4)
    source: FrameInput | None = None  # the input (priors included), to send again as context
    keyframe: bool = True
    encoded: bytes | None = None  # the client's encoding of image, when it sent one (see FrameInput.encoded)
    window: int = -1  # the window that placed it (its pose-graph node; -1: unknown, e.g. an old snapshot)

    @property
    def nbytes(self) -> int:
        image = self.image.nbytes if self.image is not None else len(self.encoded or b"")
        return int(image + self.pix.nbytes + self.points.nbytes + self.conf.nbytes + np.asarray(self.c2w).nbytes)

    @classmethod
    def from_dense(cls, old: Any, rng: np.random.Generator) -> WorldFrame:
        """A frame from a snapshot written before frames were sampled ((h, w, 3) points, (h, w) conf)."""
        pts = np.asarray(old.points, np.float32).reshape(-1, 3)
        pix = sample_indices(np.flatnonzero(finite_rows(pts)), ALIGN_POINTS_PER_FRAME, rng).astype(np.int32)
        return cls(old.index, old.frame_id, old.image, pix, pts[pix], np.asarray(old.conf, np.float32).reshape(-1)[pix],
                   old.c2w, None, getattr(old, "keyframe", True))

    def parts(self) -> dict[str, Any]:
        """What never changes once the frame is placed: its image (the client's encoding where there is one,
        8x smaller than the array at 504x378) and its sample's pixels and confidences. A frame stays in the
        snapshot for two or more windows, so these go to the session store once (an incremental item); the
        points and pose stay in the snapshot, since a pose-graph correction moves them."""
        return {"image": None if self.encoded is not None else self.image, "encoded": self.encoded,
                "pix": self.pix, "conf": self.conf}

    def without_parts(self) -> WorldFrame:
        return replace(self, source=None, image=None, encoded=None, pix=None, conf=None)

    def with_parts(self, parts: dict[str, Any]) -> WorldFrame:
        return replace(self, image=parts["image"], encoded=parts["encoded"], pix=parts["pix"], conf=parts["conf"])

    def as_input(self) -> FrameInput:
        if self.source is not None:
            return self.source
        return FrameInput(index=self.index, frame_id=self.frame_id, image=self.image, original_size=(0, 0),
                          encoded=self.encoded)


@dataclass
class WindowPlan:
    window: int
    context: list[FrameInput]
    new: list[FrameInput]
    planned_at: float = field(default_factory=time.time)
    kind: str = "window"  # "loop": a loop-verification window (new = [candidate, query]; integrate_loop)
    loop: tuple[int, int] | None = None  # (query, candidate) frame indices of a loop window
    loop_root: int | None = None  # the query whose accepted loop suggested this one (itself for a retrieval)

    @property
    def frames(self) -> list[FrameInput]:
        return self.context + self.new

    @property
    def has_pose_priors(self) -> bool:
        return all(f.pose is not None for f in self.frames)

    def request(self, tag: str = "") -> WindowRequest:
        """Images, plus the client's priors when every frame has them (the runtime needs intrinsics whenever
        it gets extrinsics, so pose priors travel only with intrinsics)."""
        frames = self.frames
        K = ext = None
        if all(f.intrinsics is not None for f in frames):
            K = np.stack([np.asarray(f.intrinsics, np.float32) for f in frames])
            if self.has_pose_priors:
                ext = invert_pose(np.stack([np.asarray(f.pose, np.float32) for f in frames]))
        return WindowRequest(images=np.stack([f.image for f in frames]), extrinsics=ext, intrinsics=K, tag=tag)


@dataclass
class WindowOutput:
    window: dict[str, Any]  # the "window" message body (without seq)
    frames: list[dict[str, Any]]  # one "frame_result" body per new frame (without seq)
    points: np.ndarray
    colors: np.ndarray
    ok: bool
    reason: str | None = None
