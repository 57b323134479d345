"""Resize and normalise images exactly as DA3's InputProcessor does for "upper_bound_resize".

Not imported from depth_anything_3 (its input processor needs torchvision). The rule: scale the longest
side to `process_res` (cv2 INTER_AREA when shrinking, INTER_CUBIC when enlarging), then resize each side
to its nearest multiple of the 14 px patch (ties up).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

PATCH_SIZE = 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ResizedImage:
    image: np.ndarray  # (h, w, 3) uint8, what the network sees
    original_size: tuple[int, int]  # (W, H)
    size: tuple[int, int]  # (w, h)
    scale_x: float  # w / W
    scale_y: float  # h / H


def _longest_side_size(width: int, height: int, process_res: int) -> tuple[int, int]:
    longest = max(width, height)
    if longest == process_res:
        return width, height
    scale = process_res / float(longest)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _nearest_multiple(x: int, patch: int = PATCH_SIZE) -> int:
    down = (x // patch) * patch
    up = down + patch
    # DA3 would give 0 -> 1 px for sides under 7 px, which the network cannot take: keep one patch.
    return max(patch, up if up - x <= x - down else down)


def model_input_size(width: int, height: int, process_res: int) -> tuple[int, int]:
    """(w, h) the network sees for a (width, height) image."""
    if width < 1 or height < 1 or process_res < 1:
        raise ValueError(f"sizes must be positive, got {width}x{height} at process_res {process_res}")
    w, h = _longest_side_size(width, height, process_res)
    return _nearest_multiple(w), _nearest_multiple(h)


def resize_for_model(image: np.ndarray, process_res: int) -> ResizedImage:
    """Resize an RGB uint8 (H, W, 3) image to the network's input size, in DA3's two steps."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) array, got {getattr(image, 'dtype', type(image))} "
                         f"{getattr(image, 'shape', '')}")
    H, W = image.shape[:2]
    out = np.ascontiguousarray(image)
    w1, h1 = _longest_side_size(W, H, process_res)
    if (w1, h1) != (W, H):
        interp = cv2.INTER_CUBIC if process_res > max(W, H) else cv2.INTER_AREA
        out = cv2.resize(out, (w1, h1), interpolation=interp)
    w, h = model_input_size(W, H, process_res)
    if (w, h) != (w1, h1):
        interp = cv2.INTER_CUBIC if (w > w1 or h > h1) else cv2.INTER_AREA
        out = cv2.resize(out, (w, h), interpolation=interp)
    return ResizedImage(image=out, original_size=(W, H), size=(w, h), scale_x=w / W, scale_y=h / H)


def scale_intrinsics(K: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """Intrinsics (..., 3, 3) after scaling the image by sx, sy (DA3's convention: fx, cx by sx; fy, cy by sy)."""
    K = np.array(K, dtype=np.float64 if np.asarray(K).dtype == np.float64 else np.float32, copy=True)
    K[..., 0, :] *= sx
    K[..., 1, :] *= sy
    return K


def intrinsics_to_processed(K_original: np.ndarray, resized: ResizedImage) -> np.ndarray:
    return scale_intrinsics(K_original, resized.scale_x, resized.scale_y)


def intrinsics_to_original(K_processed: np.ndarray, resized: ResizedImage) -> np.ndarray:
    return scale_intrinsics(K_processed, 1.0 / resized.scale_x, 1.0 / resized.scale_y)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) with ImageNet mean/std, on the input's device."""
    if images.dtype != torch.uint8 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 (..., H, W, 3), got {images.dtype} {tuple(images.shape)}")
    x = images.movedim(-1, -3).to(torch.float32) / 255.0
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return (x - mean) / std
