"""The resize rule must equal DA3's "upper_bound_resize" so served results match DA3's own inference."""

from __future__ import annotations

import importlib
import math
import sys
import types

import cv2
import numpy as np
import pytest
import torch

from serve_app.model.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    intrinsics_to_original,
    intrinsics_to_processed,
    model_input_size,
    normalize_images,
    resize_for_model,
    scale_intrinsics,
)

# (width, height, process_res): landscape, portrait, already exact, upscaling, tiny, odd, square
CASES = [(1920, 1080, 504), (480, 640, 504), (504, 378, 504), (100, 60, 504), (5, 3, 504),
         (997, 313, 280), (640, 640, 518), (154, 112, 154), (333, 777, 140)]


def reference_size(width: int, height: int, res: int) -> tuple[int, int]:
    """The rule written out plainly: longest side -> res (round), then nearest multiple of 14, ties up."""
    s = res / max(width, height)
    w, h = (width, height) if max(width, height) == res else (round(width * s), round(height * s))
    return tuple(max(14, math.floor(v / 14 + 0.5) * 14) for v in (max(w, 1), max(h, 1)))


def reference_resize(img: np.ndarray, res: int) -> np.ndarray:
    H, W = img.shape[:2]
    if max(W, H) != res:
        s = res / max(W, H)
        img = cv2.resize(img, (max(1, round(W * s)), max(1, round(H * s))),
                         interpolation=cv2.INTER_CUBIC if s > 1 else cv2.INTER_AREA)
    h1, w1 = img.shape[:2]
    w, h = reference_size(W, H, res)
    if (w, h) != (w1, h1):
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC if (w > w1 or h > h1) else cv2.INTER_AREA)
    return img


def random_image(w: int, h: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # smooth-ish content so interpolation differences would show
    base = rng.integers(0, 256, (max(2, h // 4), max(2, w // 4), 3), dtype=np.uint8)
    return np.ascontiguousarray(cv2.resize(base, (w, h), interpolation=cv2.INTER_LINEAR))


@pytest.mark.parametrize("w,h,res", CASES)
def test_model_input_size_rule(w, h, res):
    out_w, out_h = model_input_size(w, h, res)
    assert out_w % 14 == 0 and out_h % 14 == 0
    assert (out_w, out_h) == reference_size(w, h, res)
    if max(w, h) >= 7:
        # the longest side lands on the multiple of 14 nearest to res
        longest = out_w if w >= h else out_h
        assert abs(longest - res) <= 7


def test_ties_round_up_and_minimum():
    assert model_input_size(21, 21, 21) == (28, 28)  # 21 is halfway between 14 and 28
    assert model_input_size(20, 20, 20) == (14, 14)
    assert model_input_size(3, 2, 3) == (14, 14)
    assert model_input_size(1000, 10, 504) == (504, 14)


@pytest.mark.parametrize("w,h,res", CASES)
def test_resize_matches_reference(w, h, res):
    img = random_image(w, h)
    out = resize_for_model(img, res)
    ref = reference_resize(img, res)
    assert out.image.dtype == np.uint8
    assert out.image.shape == (out.size[1], out.size[0], 3)
    assert out.size == model_input_size(w, h, res)
    assert out.original_size == (w, h)
    np.testing.assert_array_equal(out.image, ref)
    assert out.scale_x == pytest.approx(out.size[0] / w)
    assert out.scale_y == pytest.approx(out.size[1] / h)


def test_matches_da3_input_processor(monkeypatch):
    """Cross-check against DA3's own resize code; torchvision (absent here) is only needed for its
    normalisation, so a stub stands in for it while the module is imported."""
    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    transforms.Normalize = lambda **kw: None
    transforms.ToTensor = lambda: None
    transforms.CenterCrop = lambda *a: None
    tv.transforms = transforms
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.transforms", transforms)
    monkeypatch.delitem(sys.modules, "depth_anything_3.utils.io.input_processor", raising=False)
    from PIL import Image

    proc = importlib.import_module("depth_anything_3.utils.io.input_processor").InputProcessor()
    for w, h, res in CASES:
        if max(w, h) < 14:
            continue  # DA3 itself yields a 1 px side there
        img = random_image(w, h, seed=w)
        pil = proc._resize_image(Image.fromarray(img), res, "upper_bound_resize")
        pil = proc._make_divisible_by_resize(pil, 14)
        np.testing.assert_array_equal(resize_for_model(img, res).image, np.asarray(pil))
        K = np.array([[500.0, 0, w / 2], [0, 480.0, h / 2], [0, 0, 1]])
        K1 = proc._resize_ixt(K, w, h, *proc._resize_longest_side(Image.fromarray(img), res).size)
        w1, h1 = proc._resize_longest_side(Image.fromarray(img), res).size
        K2 = proc._resize_ixt(K1, w1, h1, *pil.size)
        np.testing.assert_allclose(intrinsics_to_processed(K, resize_for_model(img, res)), K2, rtol=1e-12)


def test_resize_rejects_bad_input():
    with pytest.raises(ValueError):
        resize_for_model(np.zeros((10, 10, 3), np.float32), 504)
    with pytest.raises(ValueError):
        resize_for_model(np.zeros((10, 10), np.uint8), 504)
    with pytest.raises(ValueError):
        model_input_size(0, 10, 504)


def test_scaled_intrinsics_project_consistently():
    K = np.array([[800.0, 0, 639.5], [0, 790.0, 359.5], [0, 0, 1]])
    resized = resize_for_model(random_image(1280, 720), 504)
    Kp = intrinsics_to_processed(K, resized)
    pts = np.array([[0.3, -0.2, 2.0], [-1.0, 0.5, 4.0], [0.0, 0.0, 1.0]])
    uv = (K @ pts.T).T
    uv = uv[:, :2] / uv[:, 2:]
    uvp = (Kp @ pts.T).T
    uvp = uvp[:, :2] / uvp[:, 2:]
    np.testing.assert_allclose(uvp, uv * [resized.scale_x, resized.scale_y], rtol=1e-12)
    np.testing.assert_allclose(intrinsics_to_original(Kp, resized), K, rtol=1e-12)


def test_scale_intrinsics_batched_and_copy():
    K = np.tile(np.array([[100.0, 0, 50], [0, 120, 40], [0, 0, 1]], np.float32), (4, 1, 1))
    out = scale_intrinsics(K, 0.5, 2.0)
    assert out.shape == (4, 3, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[2], [[50, 0, 25], [0, 240, 80], [0, 0, 1]])
    assert K[0, 0, 0] == 100.0  # input untouched


def test_normalize_images_values_and_layout():
    imgs = torch.zeros((2, 3, 4, 5, 3), dtype=torch.uint8)
    imgs[..., 0] = 255
    imgs[1, 2, 3, 4] = torch.tensor([10, 20, 30], dtype=torch.uint8)
    out = normalize_images(imgs)
    assert out.shape == (2, 3, 3, 4, 5) and out.dtype == torch.float32
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    np.testing.assert_allclose(out[0, 0, :, 0, 0].numpy(), (np.array([1.0, 0, 0]) - mean) / std, rtol=1e-6)
    np.testing.assert_allclose(out[1, 2, :, 3, 4].numpy(), (np.array([10, 20, 30]) / 255 - mean) / std,
                               rtol=1e-5)
    with pytest.raises(ValueError):
        normalize_images(imgs.float())
