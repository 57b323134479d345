"""Video decoding for the one-shot upload route: untrusted bytes, so FFmpeg is given no choice.

The container is chosen by its magic bytes (MP4/MOV, Matroska/WebM, AVI) and opened with that demuxer only,
with no protocol allowed (a playlist, SDP, HLS or concat file can neither be demuxed nor open files or sockets)
and MOV external references off. Frames come out one at a time (`VideoFrames.next`, run in a thread pool):
each decoded frame's size is checked (the codec refuses frames over the pixel limit before allocating them),
decoding stops at a frame cap, skipped frames are never converted, and the decoded bytes and the time spent
decoding are capped. Only `ServiceError`s leave this module, in the project's words, never FFmpeg's text.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import numpy as np

from serve_app.errors import ErrorCode, ServiceError

VIDEO_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi")
# FFmpeg demuxer per accepted container, with the names its format_whitelist must list.
DEMUXERS = {"mov": "mov,mp4,m4a,3gp,3g2,mj2", "matroska": "matroska,webm", "avi": "avi"}
ACCEPTED = "MP4/MOV, Matroska/WebM or AVI"
_MOV_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot"}
NO_PROTOCOL = "none"  # matches no FFmpeg protocol: nothing can be opened by name


@dataclass(frozen=True)
class VideoLimits:
    max_pixels: int = 40_000_000
    max_decoded_frames: int = 3000
    max_decoded_bytes: int = 4 * 1024 ** 3
    max_decode_s: float = 60.0


def is_video(filename: str | None, content_type: str | None) -> bool:
    """Whether the client says this upload is a video (the bytes decide what it is: `sniff_container`)."""
    name = (filename or "").lower()
    return (content_type or "").startswith("video/") or name.endswith(VIDEO_SUFFIXES)


def sniff_container(head: bytes) -> str | None:
    """The FFmpeg demuxer for a supported container from the first bytes (>= 12), else None."""
    head = bytes(head[:12])
    if len(head) >= 12 and head[4:8] in _MOV_BOXES:
        return "mov"
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML
        return "matroska"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    return None


def demuxer_options(demuxer: str) -> dict[str, str]:
    opts = {"protocol_whitelist": NO_PROTOCOL, "format_whitelist": DEMUXERS[demuxer]}
    if demuxer == "mov":
        opts |= {"enable_drefs": "0", "use_absolute_path": "0"}  # no external data references
    return opts


def _err(code: ErrorCode, message: str) -> ServiceError:
    return ServiceError(code, message, fatal=False)


class VideoFrames:
    """Every `every`-th frame of a video as RGB uint8, at most `max_frames`, pulled one at a time with `next()`
    (None at the end). `next` and `close` may run in any thread, one at a time."""

    def __init__(self, src: bytes | IO[bytes], demuxer: str, *, max_frames: int, every: int = 1,
                 limits: VideoLimits | None = None):
        if demuxer not in DEMUXERS:
            raise ValueError(f"unknown demuxer {demuxer}")
        self.src, self.demuxer = src, demuxer
        self.limits = limits or VideoLimits()
        self.every = max(1, int(every))
        # Frames past this index are never needed: decoding stops there, however large `every` is.
        last_needed = (max(1, max_frames) - 1) * self.every + 1
        self.stop_at = min(self.limits.max_decoded_frames, last_needed)
        self.decoded = 0
        self.kept = 0
        self.decoded_bytes = 0
        self.decode_s = 0.0
        self._gen: Iterator[np.ndarray] | None = None
        self._resumed: float | None = None

    def next(self) -> np.ndarray | None:
        if self._gen is None:
            self._gen = self._frames()
        self._resumed = time.monotonic()
        try:
            return next(self._gen, None)
        finally:
            self.decode_s += time.monotonic() - self._resumed
            self._resumed = None

    def close(self) -> None:
        if self._gen is not None:
            self._gen.close()

    def _check_budget(self) -> None:
        lim = self.limits
        if self.decoded_bytes > lim.max_decoded_bytes:
            raise _err(ErrorCode.VIDEO_TOO_LARGE, f"video decodes to more than {lim.max_decoded_bytes} bytes "
                                                  f"(after {self.decoded} frames)")
        spent = self.decode_s + (time.monotonic() - self._resumed if self._resumed is not None else 0.0)
        if spent > lim.max_decode_s:
            raise _err(ErrorCode.VIDEO_TOO_LARGE, f"video takes longer than {lim.max_decode_s:g}s to decode "
                                                  f"(after {self.decoded} frames)")

    def _frames(self) -> Iterator[np.ndarray]:
        import av

        lim = self.limits
        src = self.src
        if isinstance(src, (bytes, bytearray, memoryview)):
            import io

            src = io.BytesIO(bytes(src))
        try:
            container = av.open(src, mode="r", format=self.demuxer, options=demuxer_options(self.demuxer))
        except Exception:  # noqa: BLE001 - PyAV raises many types; its text may name server paths
            raise _err(ErrorCode.INVALID_IMAGE, f"video is not a readable {ACCEPTED} file") from None
        with container:
            if not container.streams.video:
                raise _err(ErrorCode.INVALID_IMAGE, "upload has no video stream")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            w, h = ctx.width, ctx.height
            if w * h > lim.max_pixels:
                raise _err(ErrorCode.TOO_MANY_PIXELS, f"video frames of {w}x{h} exceed {lim.max_pixels} pixels")
            ctx.thread_count = 1  # one core per decode: the pool's size is the CPU bound
            # FFmpeg refuses a frame over this before allocating it, whatever the stream header said.
            ctx.options = {"max_pixels": str(lim.max_pixels)}
            try:
                for packet in container.demux(stream):
                    if self.decoded >= self.stop_at or self.kept * self.every >= self.stop_at:
                        break  # the next frame to keep lies past the cap: decode nothing more
                    self._check_budget()
                    for frame in packet.decode():
                        self.decoded += 1
                        fw, fh = frame.width, frame.height
                        if fw * fh > lim.max_pixels:
                            raise _err(ErrorCode.TOO_MANY_PIXELS,
                                       f"video frame {self.decoded} of {fw}x{fh} exceeds {lim.max_pixels} pixels")
                        self.decoded_bytes += sum(p.buffer_size for p in frame.planes)
                        self._check_budget()
                        if (self.decoded - 1) % self.every == 0:
                            rgb = frame.to_ndarray(format="rgb24")
                            self.decoded_bytes += rgb.nbytes
                            self._check_budget()
                            self.kept += 1
                            yield rgb
                        if self.decoded >= self.stop_at or self.kept * self.every >= self.stop_at:
                            break
            except ServiceError:
                raise
            except av.error.ArgumentError:  # the codec's own max_pixels refusal lands here (EINVAL)
                raise _err(ErrorCode.TOO_MANY_PIXELS, f"video frame {self.decoded + 1} is malformed or exceeds "
                                                      f"{lim.max_pixels} pixels") from None
            except Exception:  # noqa: BLE001 - corrupt packets, unsupported codecs
                raise _err(ErrorCode.INVALID_IMAGE,
                           f"video data could not be decoded (after {self.decoded} frames)") from None
        if self.kept == 0:
            raise _err(ErrorCode.INVALID_IMAGE, "video has no decodable frames")


def decode_video(data: bytes | IO[bytes], *, max_frames: int, every: int = 1,
                 limits: VideoLimits | None = None) -> list[np.ndarray]:
    """All the frames `VideoFrames` gives, in one list (for small clips and tests; the upload route streams)."""
    head = data[:12] if isinstance(data, (bytes, bytearray)) else _peek(data)
    demuxer = sniff_container(head)
    if demuxer is None:
        raise _err(ErrorCode.UNSUPPORTED_FORMAT, f"not a supported video container ({ACCEPTED})")
    frames = VideoFrames(data, demuxer, max_frames=max_frames, every=every, limits=limits)
    out = []
    try:
        while (f := frames.next()) is not None:
            out.append(f)
    finally:
        frames.close()
    return out


def _peek(f: IO[bytes]) -> bytes:
    pos = f.tell()
    head = f.read(12)
    f.seek(pos)
    return head
