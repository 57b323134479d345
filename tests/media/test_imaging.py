"""Image decoding: modes, 16-bit scaling, EXIF orientation, limits checked before decoding, error codes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from serve_app.errors import ErrorCode, ServiceError
from serve_app.media.imaging import ImageLimits, decode_image, encode_image

LIMITS = ImageLimits()


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def code_of(data: bytes, limits: ImageLimits = LIMITS) -> ErrorCode:
    with pytest.raises(ServiceError) as ei:
        decode_image(data, limits)
    assert ei.value.fatal is False
    return ei.value.code


def gradient(h: int = 12, w: int = 16) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 15, y * 20, (x + y) * 7], axis=-1).astype(np.uint8)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def hand_made_png(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height but carries one tiny IDAT: a decompression-bomb header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def test_png_round_trip_exact():
    a = gradient()
    out = decode_image(encode_image(a, "PNG"), LIMITS)
    assert out.dtype == np.uint8 and out.shape == (12, 16, 3) and np.array_equal(out, a)


def test_jpeg_and_webp_decode():
    y, x = np.mgrid[0:32, 0:40]
    a = np.stack([x * 6, y * 7, np.full_like(x, 90)], axis=-1).astype(np.uint8)  # smooth: lossy-friendly
    for fmt in ("JPEG", "WEBP"):
        out = decode_image(encode_image(a, fmt, quality=95), LIMITS)
        assert out.shape == (32, 40, 3)
        assert np.abs(out.astype(int) - a).mean() < 6


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "1"])
def test_modes_convert_to_rgb(mode):
    a = gradient()
    img = Image.fromarray(a).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = decode_image(save(img, fmt), LIMITS)
    assert out.dtype == np.uint8 and out.shape == (12, 16, 3)
    expected = np.asarray(img.convert("RGB"))
    tol = 8 if fmt == "JPEG" else 0
    assert np.abs(out.astype(int) - expected).max() <= tol


def test_rgba_alpha_dropped_keeps_colour():
    a = np.zeros((4, 5, 4), np.uint8)
    a[..., 0], a[..., 3] = 200, 0  # fully transparent red
    out = decode_image(encode_image(a, "PNG"), LIMITS)
    assert out.shape == (4, 5, 3) and (out[..., 0] == 200).all() and (out[..., 1:] == 0).all()


def test_palette_with_transparency():
    img = Image.fromarray(gradient()).convert("P")
    img.info["transparency"] = 0
    out = decode_image(save(img, "PNG", transparency=0), LIMITS)
    assert out.shape == (12, 16, 3)


@pytest.mark.parametrize("value,expected", [(0, 0), (65535, 255), (257, 1), (32896, 128), (128, 0), (129, 1)])
def test_16bit_grey_scaled(value, expected):
    a = np.full((3, 4), value, np.uint16)
    data = save(Image.fromarray(a), "PNG")  # a 16-bit greyscale PNG
    out = decode_image(data, LIMITS)
    assert out.shape == (3, 4, 3) and (out == expected).all()


def test_16bit_ramp_is_monotonic_and_full_range():
    a = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    out = decode_image(save(Image.fromarray(a), "PNG"), LIMITS)[..., 0].ravel()
    assert out[0] == 0 and out[-1] == 255 and (np.diff(out.astype(int)) >= 0).all()
    assert np.allclose(out, a.ravel() / 257.0, atol=0.5)


def test_exif_orientation_applied():
    a = gradient(6, 10)  # landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    data = save(Image.fromarray(a), "JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image(data, LIMITS)
    assert out.shape == (10, 6, 3)
    ref = np.rot90(a, k=-1)
    assert np.abs(out.astype(int) - ref).mean() < 8


def test_bomb_header_rejected_before_decoding():
    data = hand_made_png(100_000, 100_000)
    assert len(data) < 200
    assert code_of(data) == ErrorCode.TOO_MANY_PIXELS
    # Under Pillow's own bomb threshold but over our limit: our header check rejects it.
    assert code_of(hand_made_png(3000, 3000), ImageLimits(max_pixels=1_000_000)) == ErrorCode.TOO_MANY_PIXELS
    # The same hand-made file within the limit is decoded and found truncated: the check really came first.
    assert code_of(hand_made_png(3000, 3000)) == ErrorCode.INVALID_IMAGE


def test_too_many_bytes():
    data = encode_image(gradient(), "PNG")
    assert code_of(data, ImageLimits(max_bytes=len(data) - 1)) == ErrorCode.IMAGE_TOO_LARGE
    assert decode_image(data, ImageLimits(max_bytes=len(data))).shape == (12, 16, 3)


def test_truncated_and_corrupt():
    jpeg = encode_image(gradient(64, 64), "JPEG")
    assert code_of(jpeg[: len(jpeg) // 2]) == ErrorCode.INVALID_IMAGE
    png = encode_image(gradient(64, 64), "PNG")
    assert code_of(png[: len(png) - 30]) == ErrorCode.INVALID_IMAGE
    corrupt = bytearray(png)
    corrupt[60:80] = b"\x00" * 20
    assert code_of(bytes(corrupt)) == ErrorCode.INVALID_IMAGE
    assert code_of(b"") == ErrorCode.INVALID_IMAGE
    assert code_of(b"hello, not an image") == ErrorCode.INVALID_IMAGE
    assert code_of(jpeg[:4]) == ErrorCode.INVALID_IMAGE


@pytest.mark.parametrize("fmt", ["BMP", "GIF", "TIFF"])
def test_disallowed_formats(fmt):
    assert code_of(save(Image.fromarray(gradient()), fmt)) == ErrorCode.UNSUPPORTED_FORMAT


def test_allowed_formats_configurable():
    png = encode_image(gradient(), "PNG")
    assert code_of(png, ImageLimits(allowed_formats=("JPEG",))) == ErrorCode.UNSUPPORTED_FORMAT
    bmp = save(Image.fromarray(gradient()), "BMP")
    assert decode_image(bmp, ImageLimits(allowed_formats=("bmp",))).shape == (12, 16, 3)


def test_encode_image_rejects_bad_input():
    with pytest.raises(ValueError):
        encode_image(np.zeros((4, 4, 3), np.float32))
    assert decode_image(encode_image(np.full((4, 5), 77, np.uint8), "PNG"), LIMITS)[0, 0].tolist() == [77] * 3


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
@pytest.mark.slow
def test_property_arbitrary_bytes(data):
    for blob in (data, b"\x89PNG\r\n\x1a\n" + data, b"\xff\xd8\xff" + data, b"RIFF" + data[:4] + b"WEBP" + data):
        try:
            out = decode_image(blob, LIMITS)
        except ServiceError as exc:
            assert exc.code in (ErrorCode.INVALID_IMAGE, ErrorCode.IMAGE_TOO_LARGE, ErrorCode.TOO_MANY_PIXELS,
                                ErrorCode.UNSUPPORTED_FORMAT)
        else:
            assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 3000), st.binary(min_size=1, max_size=8))
def test_property_damaged_real_images(cut, junk):
    png = encode_image(gradient(20, 20), "PNG")
    for blob in (png[:cut], png[:cut] + junk + png[cut + len(junk):]):
        try:
            out = decode_image(blob, LIMITS)
        except ServiceError as exc:
            assert exc.code in (ErrorCode.INVALID_IMAGE, ErrorCode.IMAGE_TOO_LARGE, ErrorCode.TOO_MANY_PIXELS,
                                ErrorCode.UNSUPPORTED_FORMAT)
        else:
            assert out.shape[2] == 3


def sixteen_bit_png(width: int, height: int, value: int = 0) -> bytes:
    return save(Image.fromarray(np.full((height, width), value, np.uint16)), "PNG")


def test_bit_depth_limit_from_the_header():
    data = sixteen_bit_png(8, 8, 1000)
    assert data[24] == 16  # IHDR bit depth
    assert code_of(data, ImageLimits(max_bit_depth=8)) == ErrorCode.UNSUPPORTED_FORMAT
    assert decode_image(data, ImageLimits(max_bit_depth=16)).shape == (8, 8, 3)
    assert decode_image(encode_image(gradient(), "PNG"), ImageLimits(max_bit_depth=8)).shape == (12, 16, 3)


def test_decoded_bytes_limit_checked_before_decoding():
    # 3000x3000 RGB would decode to 27 MB: refused from the header (the same file within the limit is decoded
    # and found truncated, so the check came first).
    assert code_of(hand_made_png(3000, 3000), ImageLimits(max_decoded_bytes=20_000_000)) == ErrorCode.IMAGE_TOO_LARGE
    assert code_of(hand_made_png(3000, 3000), ImageLimits(max_decoded_bytes=28_000_000)) == ErrorCode.INVALID_IMAGE
    data = encode_image(gradient(), "PNG")
    assert code_of(data, ImageLimits(max_decoded_bytes=12 * 16 * 3 - 1)) == ErrorCode.IMAGE_TOO_LARGE
    assert decode_image(data, ImageLimits(max_decoded_bytes=12 * 16 * 3)).shape == (12, 16, 3)


@pytest.mark.slow
def test_16bit_conversion_matches_the_formula_without_int64_copies():
    import tracemalloc

    rng = np.random.default_rng(1)
    a = rng.integers(0, 65536, (1500, 2000), dtype=np.uint16)
    data = save(Image.fromarray(a), "PNG", compress_level=1)
    tracemalloc.start()
    out = decode_image(data, LIMITS)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    expected = ((a.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    assert np.array_equal(out[..., 0], expected) and np.array_equal(out[..., 2], expected)
    # 3M pixels: 2 bytes (16-bit) + 1 (grey) + 3 (RGB) each, plus the encoded copy; an int64 path needs 8 more
    assert peak < 3_000_000 * 7 + 2 * len(data), peak
