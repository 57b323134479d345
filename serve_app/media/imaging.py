"""Untrusted image bytes -> RGB uint8 array, with limits checked before any pixel is decoded.

Only `ServiceError` leaves `decode_image` (INVALID_IMAGE, IMAGE_TOO_LARGE, TOO_MANY_PIXELS or UNSUPPORTED_FORMAT): Pillow's own
errors, including its DecompressionBombError/Warning, are translated. Bit depth and decoded bytes are checked from
the header before decoding and again on the decoded result (a header can lie).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from serve_app.errors import ErrorCode, ServiceError

_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # IHDR colour type -> samples per pixel
# 0..65535 -> 0..255 with rounding, by table: no int64 copy of a 16-bit image (that was 8 bytes a pixel)
_LUT16 = ((np.arange(65536, dtype=np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


@dataclass
class ImageLimits:
    max_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 40_000_000
    allowed_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP")
    max_bit_depth: int = 16
    max_decoded_bytes: int = 128 * 1024 * 1024


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
        a = np.asarray(img)
        if a.dtype != np.uint16:  # mode I (int32): clip into the table's range
            a = np.clip(a, 0, 65535).astype(np.uint16)
        grey = _LUT16[a]
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # Pillow wants palette transparency resolved through RGBA first
    return np.array(img.convert("RGB"), dtype=np.uint8)


def declared_depth(data: bytes, img: Image.Image) -> tuple[int, int]:
    """(bits per sample, samples per pixel) the header declares."""
    if img.format == "PNG" and len(data) >= 26 and data[12:16] == b"IHDR":
        return int(data[24]), _PNG_CHANNELS.get(int(data[25]), 4)
    bands = len(img.getbands())
    return (16 if img.mode in _SIXTEEN_BIT else 8), bands


def _check_declared_cost(data: bytes, img: Image.Image, limits: ImageLimits) -> None:
    depth, channels = declared_depth(data, img)
    if depth > limits.max_bit_depth:
        raise _err(ErrorCode.UNSUPPORTED_FORMAT,
                   f"{depth}-bit images are not accepted (at most {limits.max_bit_depth} bits per sample)")
    w, h = img.size
    native = w * h * channels * ((depth + 7) // 8)
    declared = max(native, w * h * 3)  # what the decoder holds, and the RGB result
    if declared > limits.max_decoded_bytes:
        raise _err(ErrorCode.IMAGE_TOO_LARGE,
                   f"image of {w}x{h} ({depth}-bit, {channels} channels) would decode to {declared} bytes, "
                   f"over {limits.max_decoded_bytes}")


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
        _check_declared_cost(data, img, limits)
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
    if rgb.nbytes > limits.max_decoded_bytes or rgb.shape[0] * rgb.shape[1] > limits.max_pixels:
        raise _err(ErrorCode.IMAGE_TOO_LARGE, f"image decoded to {rgb.nbytes} bytes, over {limits.max_decoded_bytes}")
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
