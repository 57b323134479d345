"""Frame sources for streaming: video files (PyAV, imageio as fallback) and image folders / globs."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


def resize_longest(image: np.ndarray, longest: int | None) -> np.ndarray:
    """Downscale so the longest side is `longest` px (never upscales); None leaves the image as is."""
    if not longest:
        return image
    h, w = image.shape[:2]
    if max(h, w) <= longest:
        return image
    s = longest / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))


def _natural_key(path: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path)]


def list_image_files(dir_or_glob: str | os.PathLike) -> list[str]:
    """Image files of a directory (non-recursive) or a glob pattern, in natural order (2 before 10)."""
    p = str(dir_or_glob)
    paths = glob.glob(os.path.join(p, "*")) if os.path.isdir(p) else glob.glob(p, recursive=True)
    files = [f for f in paths if os.path.isfile(f) and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(files, key=_natural_key)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB with EXIF orientation applied."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img) or img
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            a = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
            grey = ((a * 255 + 32767) // 65535).astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=2)
        return np.asarray(img.convert("RGB"))


def iter_image_files(dir_or_glob: str | os.PathLike, every: int = 1, max_frames: int | None = None,
                     resize: int | None = None) -> Iterator[tuple[str | int, np.ndarray]]:
    """Yield (frame_id, RGB array) for images in natural order; frame_id is the file stem (or the position when
    the stem is longer than the protocol's 64 characters)."""
    files = list_image_files(dir_or_glob)
    if not files:
        raise FileNotFoundError(f"no image files match {dir_or_glob}")
    for i, f in enumerate(files[::max(1, every)]):
        if max_frames is not None and i >= max_frames:
            return
        stem = Path(f).stem
        yield (stem if 0 < len(stem) <= 64 else i), resize_longest(load_image(f), resize)


def iter_video_frames(path: str | os.PathLike, every: int = 1, fps: float | None = None,
                      max_frames: int | None = None, resize: int | None = None,
                      with_timestamp: bool = False) -> Iterator[tuple]:
    """Yield (frame_id, RGB array) — or (frame_id, RGB array, t_seconds) with with_timestamp — from a video.

    frame_id is the decoded frame's index in the video. `fps` keeps frames at most that often (by timestamp),
    `every` then keeps every N-th of those, `resize` bounds the longest side.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"video not found: {path}")
    every = max(1, int(every))
    kept = taken = 0
    next_t = None
    for index, t, rgb in _decode_video(str(path)):
        if fps:
            if next_t is not None and t < next_t - 1e-6:
                continue
            next_t = (t if next_t is None else next_t) + 1.0 / fps
        kept += 1
        if (kept - 1) % every:
            continue
        if max_frames is not None and taken >= max_frames:
            return
        taken += 1
        img = resize_longest(rgb, resize)
        yield (index, img, t) if with_timestamp else (index, img)


def _decode_video(path: str) -> Iterator[tuple[int, float, np.ndarray]]:
    try:
        import av
    except ImportError:
        av = None
    if av is not None:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = float(stream.average_rate or stream.guessed_rate or 30)
            for i, frame in enumerate(container.decode(stream)):
                t = float(frame.time) if frame.time is not None else i / rate
                yield i, t, frame.to_ndarray(format="rgb24")
        return
    import imageio.v3 as iio

    meta = iio.immeta(path)
    rate = float(meta.get("fps") or 30)
    for i, frame in enumerate(iio.imiter(path)):
        yield i, i / rate, np.asarray(frame)[..., :3]


def video_frame_count(path: str | os.PathLike) -> int | None:
    """Frames in the video's first stream if the container says (for progress bars), else None."""
    try:
        import av

        with av.open(str(path)) as container:
            n = container.streams.video[0].frames
            return int(n) or None
    except Exception:  # noqa: BLE001
        return None
