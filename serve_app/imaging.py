"""Untrusted image bytes -> RGB uint8 array, with limits checked before any pixel is decoded.

Only `ServiceError` leaves `decode_image` (INVALID_IMAGE, IMAGE_TOO_LARGE, TOO_MANY_PIXELS or UNSUPPORTED_FORMAT): Pillow's own
errors, including its DecompressionBombError/Warning, are translated.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from serve_app.errors import ErrorCode, ServiceError

_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


@dataclass
class ImageLimits:
    max_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 40_000_000
    allowed_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP")


def _err(code: ErrorCode, message: str) -> ServiceError:
    return ServiceError(code, message, fatal=False)


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    allowed = tuple(f.upper() for f in limits.allowed_formats)
    try:
        # Only the allowed plugins parse the data for real; others are tried below just to name the format.
        return Image.open(io.BytesIO(data), formats=allowed)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _err(ErrorCode.TOO_MANY_PIXELS, f"image declares too many pixels ({exc})") from None
    except UnidentifiedImageError:
        pass
    except Exception as exc:  # noqa: BLE001 - a plugin choking on a corrupt header
        raise _err(ErrorCode.INVALID_IMAGE, f"corrupt image header: {type(exc).__name__}") from None
    try:
        other = Image.open(io.BytesIO(data))
        fmt = other.format
        other.close()
    except Exception:  # noqa: BLE001 - not an image Pillow knows at all
        raise _err(ErrorCode.INVALID_IMAGE, "bytes are not a recognised image") from None
    raise _err(ErrorCode.UNSUPPORTED_FORMAT, f"image format {fmt} not allowed (allowed: {', '.join(allowed)})")


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        return np.array(img, dtype=np.uint8)
    if mode in _SIXTEEN_BIT:
        # 16-bit grey (PNG opens as I;16 or I): map 0..65535 onto 0..255 with rounding.
        a = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        grey = ((a * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # Pillow wants palette transparency resolved through RGBA first
    return np.array(img.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes, limits: ImageLimits | None = None) -> np.ndarray:
    """Decode JPEG / PNG / WebP bytes to an (H, W, 3) uint8 RGB array with EXIF orientation applied."""
    limits = limits or ImageLimits()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _err(ErrorCode.INVALID_IMAGE, "image must be bytes")
    data = bytes(data)
    if not data:
        raise _err(ErrorCode.INVALID_IMAGE, "image is empty")
    if len(data) > limits.max_bytes:
        raise _err(ErrorCode.IMAGE_TOO_LARGE, f"image of {len(data)} bytes exceeds {limits.max_bytes}")
    img = _open(data, limits)
    try:
        w, h = img.size
        if w <= 0 or h <= 0:
            raise _err(ErrorCode.INVALID_IMAGE, f"image declares size {w}x{h}")
        if w * h > limits.max_pixels:  # from the header, before decoding: decompression bombs stop here
            raise _err(ErrorCode.TOO_MANY_PIXELS, f"image of {w}x{h} pixels exceeds {limits.max_pixels}")
        try:
            img.load()
        except ServiceError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise _err(ErrorCode.TOO_MANY_PIXELS, "image expands to too many pixels") from None
        except MemoryError:
            raise _err(ErrorCode.IMAGE_TOO_LARGE, "image too large to decode") from None
        except Exception as exc:  # noqa: BLE001 - truncated / corrupt data, any plugin error
            raise _err(ErrorCode.INVALID_IMAGE, f"image data could not be decoded: {str(exc)[:120]}") from None
        try:
            oriented = ImageOps.exif_transpose(img)
        except Exception:  # noqa: BLE001 - corrupt EXIF: keep the stored orientation rather than fail
            oriented = img
        try:
            rgb = _to_rgb(oriented if oriented is not None else img)
        except Exception as exc:  # noqa: BLE001
            raise _err(ErrorCode.INVALID_IMAGE, f"image mode {img.mode} could not be converted: {exc}") from None
    finally:
        img.close()
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.size == 0:
        raise _err(ErrorCode.INVALID_IMAGE, f"decoded to unexpected shape {rgb.shape}")
    return np.ascontiguousarray(rgb)


def encode_image(array: np.ndarray, fmt: str = "JPEG", quality: int = 90) -> bytes:
    """(H, W, 3) or (H, W) uint8 -> encoded bytes (JPEG / PNG / WEBP)."""
    a = np.asarray(array)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ValueError(f"expected (H, W[, 3|4]) uint8, got {a.shape} {a.dtype}")
    fmt = fmt.upper()
    if fmt == "JPG":
        fmt = "JPEG"
    img = Image.fromarray(a)
    if fmt == "JPEG" and img.mode == "RGBA":
        img = img.convert("RGB")
    buf = io.BytesIO()
    kwargs = {"quality": int(quality)} if fmt in ("JPEG", "WEBP") else {}
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()
