"""The loop keyframes a session snapshot carries, so a replica taking the session over can still verify loops to
places seen before the takeover. Pure numpy.

Verification runs the candidate keyframe's image through the model again and re-aligns it to the keyframe's stored
depth sample, so both travel: the image at the model input size as a JPEG (quality LOOP_IMAGE_QUALITY, 4:4:4:
~40 kB at 504x378, 14x smaller than the raw array) and LOOP_SNAPSHOT_POINTS of the sample with its points as float16
(they are in the window's gauge normalised to median depth 1: 1e-3 relative precision, far below the verification's
5 % RMSE bound): ~15 kB.

Bounded: at most `loop_snapshot_keyframes` keyframes, spread over the session: every `stride`-th keyframe is
carried, and when that exceeds the bound every other carried one is dropped and the stride doubles (a revisit
can be to any earlier place). Each entry never changes once made, so it is sent to the session store once
(serve_app/sessions/stream_state.py): a snapshot carries only the entries the store does not hold yet.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from serve_app.media.imaging import decode_image
from serve_app.recon.loops import Keyframe
from serve_app.recon.plan import FrameInput, is_world_part_key
from serve_app.sessions.stream_state import INCREMENTAL

LOOP_SNAPSHOT_POINTS = 2000  # of a keyframe's depth sample (4000): verification fits 7 parameters robustly
LOOP_IMAGE_QUALITY = 90  # with full-resolution chroma: mean error ~1 grey level at 504x378, 40 kB


def encode_jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="JPEG", quality=LOOP_IMAGE_QUALITY, subsampling=0)
    return buf.getvalue()


def encode_keyframe(kf: Keyframe) -> dict[str, Any]:
    """A keyframe as plain values (the journal codec stores it without pickle)."""
    src = kf.source
    step = -(-len(kf.pix) // LOOP_SNAPSHOT_POINTS) or 1  # (the sample is random: every step-th is one too)
    return {"index": int(kf.index), "window": int(kf.window), "frame_id": src.frame_id,
            "descriptor": np.asarray(kf.descriptor, np.float32),
            "pix": np.asarray(kf.pix[::step], np.int32), "points": np.asarray(kf.points[::step], np.float16),
            "c2w": np.asarray(kf.c2w, np.float64),
            "image": encode_jpeg(src.image),
            "intrinsics": None if src.intrinsics is None else np.asarray(src.intrinsics, np.float32),
            "pose": None if src.pose is None else np.asarray(src.pose, np.float32)}


def decode_keyframe(e: dict[str, Any]) -> Keyframe:
    image = decode_image(e["image"])
    src = FrameInput(index=int(e["index"]), frame_id=e["frame_id"], image=image,
                     original_size=(int(image.shape[1]), int(image.shape[0])), intrinsics=e["intrinsics"],
                     pose=e["pose"])
    return Keyframe(int(e["index"]), int(e["window"]), np.asarray(e["descriptor"], np.float32), src,
                    np.asarray(e["pix"], np.int32), np.asarray(e["points"], np.float32),
                    np.asarray(e["c2w"], np.float64))


@dataclass
class LoopCarry:
    """Which loop keyframes the snapshot carries, their encodings, and which of them the store holds already."""

    limit: int
    stride: int = 1
    offered: int = 0  # keyframes offered so far (their ordinal decides whether one is carried)
    carried: list[int] = field(default_factory=list)  # frame indices, oldest first
    encoded: dict[int, dict] = field(default_factory=dict)  # index -> entry, for carried keyframes
    sent: set[int] = field(default_factory=set)  # entries the store holds (as far as this worker knows)

    def offer(self, kf: Keyframe) -> None:
        """A new keyframe (off the windows' path: it is JPEG-encoded here if carried)."""
        ordinal = self.offered
        self.offered += 1
        if self.limit <= 0 or ordinal % self.stride:
            return
        self.carried.append(kf.index)
        self.encoded[kf.index] = encode_keyframe(kf)
        while len(self.carried) > self.limit:
            self.carried = self.carried[::2]
            self.stride *= 2
        self._forget_dropped()

    def keep_only(self, alive: set[int]) -> None:
        """Forget carried keyframes the loop detector no longer holds."""
        if any(i not in alive for i in self.carried):
            self.carried = [i for i in self.carried if i in alive]
            self._forget_dropped()

    def _forget_dropped(self) -> None:
        keep = set(self.carried)
        for i in [i for i in self.encoded if i not in keep]:
            del self.encoded[i]
        self.sent &= keep

    def snapshot(self) -> dict:
        """The snapshot's incremental entry: every carried index, the entries not sent yet (marked sent: the
        worker commits snapshots in order, and a commit that fails stops the worker)."""
        new = {i: self.encoded[i] for i in self.carried if i not in self.sent}
        self.sent |= set(new)
        return {"keep": list(self.carried), "new": new}

    def state(self) -> dict:
        return {"stride": self.stride, "offered": self.offered}

    @classmethod
    def restore(cls, limit: int, snap: dict) -> tuple[LoopCarry, list[Keyframe]]:
        """The carry state and the carried keyframes of a (stored) snapshot; all of them count as sent."""
        st = snap.get("loop_carry") or {}
        inc = snap.get(INCREMENTAL) or {}
        entries = inc.get("new", {})
        ids = [i for i in inc.get("keep", []) if i in entries and not is_world_part_key(i)]
        carry = cls(limit, stride=int(st.get("stride", 1)), offered=int(st.get("offered", 0)), carried=ids,
                    encoded={i: entries[i] for i in ids}, sent=set(ids))
        return carry, [decode_keyframe(entries[i]) for i in ids]
