"""Video decoding for the one-shot upload route (PyAV, in memory)."""

from __future__ import annotations

import io

import numpy as np

from serve_app.errors import ErrorCode, ServiceError

VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi")


def is_video(filename: str | None, content_type: str | None) -> bool:
    name = (filename or "").lower()
    return (content_type or "").startswith("video/") or name.endswith(VIDEO_SUFFIXES)


def decode_video(data: bytes, *, max_frames: int, every: int = 1, max_pixels: int = 40_000_000) -> list[np.ndarray]:
    """Every `every`-th frame as RGB uint8, at most `max_frames`; undecodable input -> INVALID_IMAGE."""
    import av

    frames: list[np.ndarray] = []
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise ServiceError(ErrorCode.INVALID_IMAGE, "upload has no video stream")
            stream = container.streams.video[0]
            if stream.width * stream.height > max_pixels:
                raise ServiceError(ErrorCode.TOO_MANY_PIXELS,
                                   f"video frames of {stream.width}x{stream.height} exceed {max_pixels} pixels")
            for i, frame in enumerate(container.decode(stream)):
                if i % every:
                    continue
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) >= max_frames:
                    break
    except ServiceError:
        raise
    except Exception as exc:  # noqa: BLE001 - PyAV raises many types for broken containers
        raise ServiceError(ErrorCode.INVALID_IMAGE, f"could not decode video: {type(exc).__name__}: {exc}")
    if not frames:
        raise ServiceError(ErrorCode.INVALID_IMAGE, "video has no decodable frames")
    return frames
