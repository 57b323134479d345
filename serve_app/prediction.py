"""The per-window result every model backend (DA3 runtime, oracle) returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class WindowPrediction:
    """One window of N views, all arrays numpy, in the window's own gauge.

    depth:       (N, H, W) float32, along the camera z axis
    conf:        (N, H, W) float32, larger is more confident
    extrinsics:  (N, 3, 4) float32 world-to-camera (OpenCV: x right, y down, z forward)
    intrinsics:  (N, 3, 3) float32 in processed-image pixels
    images:      (N, H, W, 3) uint8, the processed RGB the model saw; None once the model deployment has
                 returned it (the ingress already holds the images, so they are not shipped back)
    is_metric:   depth is metric (metric/nested models, or scale fixed by client priors)
    descriptors: optional (N, D) float32, one L2-normalised global descriptor per view (cosine similarity =
                 dot product), for loop retrieval; None when the backend gives none
    """

    depth: np.ndarray
    conf: np.ndarray
    extrinsics: np.ndarray
    intrinsics: np.ndarray
    images: np.ndarray | None
    is_metric: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    descriptors: np.ndarray | None = None

    @property
    def num_views(self) -> int:
        return int(self.depth.shape[0])

    @property
    def hw(self) -> tuple[int, int]:
        return int(self.depth.shape[1]), int(self.depth.shape[2])


@dataclass
class WindowRequest:
    """What the ingress sends to a model backend for one window.

    images:      (N, H, W, 3) uint8, already resized to the processing resolution (sides multiples of 14)
    extrinsics:  optional (N, 4, 4) world-to-camera priors from the client
    intrinsics:  optional (N, 3, 3) priors in processed-image pixels
    """

    images: np.ndarray
    extrinsics: np.ndarray | None = None
    intrinsics: np.ndarray | None = None
    tag: str = ""  # free text for logs (session id, window index)

    @property
    def shape_key(self) -> tuple:
        # Windows batch together only when their tensors stack and their prior kinds match.
        return (
            tuple(self.images.shape),
            self.extrinsics is not None,
            self.intrinsics is not None,
        )
