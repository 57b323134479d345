"""Untrusted media without Ray: video container sniffing and FFmpeg lock-down, streamed video decoding with
its caps, the upload body limit, and the per-session decode budget. The same cases run against the real app in
tests/media/test_hostile_media.py."""

from __future__ import annotations

import asyncio
import io
import os
import threading
import time
import tracemalloc
from fractions import Fraction

import av
import numpy as np
import pytest
from starlette.requests import Request

from serve_app.errors import ErrorCode, ServiceError
from serve_app.media.decode_pool import CpuBudget, DecodeGate
from serve_app.media.uploads import BodyLimit, classify_upload, limited_request
from serve_app.media.video import VideoFrames, VideoLimits, decode_video, demuxer_options, sniff_container

SECRET = "SECRET=hunter2-media"
LIBRARY_WORDS = ("Errno", "avformat", "avcodec", "returned", "FileNotFound", "InvalidData", "No such file")


def encode_video(frames, codec: str = "mpeg4", fmt: str = "mp4", rate: int = 10) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height, s.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def small_then_large(n_small: int = 2, n_large: int = 3, big: tuple[int, int] = (1080, 1920)) -> bytes:
    """Matroska/MJPEG whose header (and first frames) say 64x48, then frames of `big`: each JPEG packet
    carries its own size."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as c:
        s = c.add_stream("mjpeg", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuvj420p"
        for _ in range(n_small):
            for p in s.encode(av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")):
                c.mux(p)
        large = av.CodecContext.create("mjpeg", "w")
        large.width, large.height, large.pix_fmt, large.time_base = big[1], big[0], "yuvj420p", Fraction(1, 10)
        for k in range(n_large):
            f = av.VideoFrame.from_ndarray(np.zeros((big[0], big[1], 3), np.uint8), format="rgb24")
            f.pts = n_small + k
            for p in large.encode(f):
                p.stream, p.pts, p.dts = s, n_small + k, n_small + k
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def hostile_playlists(secret_path: str) -> dict[str, bytes]:
    """Text formats FFmpeg would happily open by probing: each names a file or a socket."""
    return {
        "ffconcat": f"ffconcat version 1.0\nfile {secret_path}\n".encode(),
        "ffconcat_relative": b"ffconcat version 1.0\nfile leak.nfo\n",
        "sdp": (b"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\n"
                b"m=video 5004 RTP/AVP 96\na=rtpmap:96 H264/90000\n"),
        "hls": f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile://{secret_path}\n#EXT-X-ENDLIST\n".encode(),
        "hls_http": b"#EXTM3U\n#EXTINF:1,\nhttp://127.0.0.1:9/x.ts\n#EXT-X-ENDLIST\n",
        "tty": SECRET.encode() + b"\n",
    }


def raises(fn, *args, **kw) -> ServiceError:
    with pytest.raises(ServiceError) as ei:
        fn(*args, **kw)
    for word in LIBRARY_WORDS:
        assert word not in ei.value.message, ei.value.message
    return ei.value


@pytest.fixture(scope="module")
def clip() -> bytes:
    rng = np.random.default_rng(0)
    return encode_video([rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(10)])


def test_sniff_accepts_real_containers_only(clip, tmp_path):
    frames = [np.zeros((32, 32, 3), np.uint8)] * 2
    assert sniff_container(clip) == "mov"
    assert sniff_container(encode_video(frames, "libvpx", "webm")) == "matroska"
    assert sniff_container(encode_video(frames, "mpeg4", "matroska")) == "matroska"
    assert sniff_container(encode_video(frames, "mpeg4", "avi")) == "avi"
    for name, data in hostile_playlists(str(tmp_path / "s")).items():
        assert sniff_container(data) is None, name
        with pytest.raises(ServiceError) as ei:
            classify_upload(data[:16], "x.mp4", "video/mp4")
        assert ei.value.code is ErrorCode.UNSUPPORTED_FORMAT
        assert classify_upload(data[:16], "x.png", "image/png") is None  # goes to the image decoder
    assert classify_upload(clip[:16], "innocent.png", "image/png") == "mov"  # bytes decide, not names


def test_playlists_are_refused_without_touching_files_or_sockets(tmp_path, monkeypatch):
    secret = tmp_path / "leak.nfo"
    secret.write_text(SECRET)
    monkeypatch.chdir(tmp_path)
    for name, data in hostile_playlists(str(secret)).items():
        t0 = time.monotonic()
        e = raises(decode_video, data, max_frames=5)
        assert e.code is ErrorCode.UNSUPPORTED_FORMAT and time.monotonic() - t0 < 2, name
        # Even forced through our demuxers, the bytes are no video: the project's words, no library text.
        for demuxer in ("mov", "matroska", "avi"):
            e = raises(lambda d=demuxer, b=data: VideoFrames(b, d, max_frames=5).next())
            assert e.code is ErrorCode.INVALID_IMAGE
    # The protocol whitelist itself: FFmpeg's concat demuxer, with our options, cannot open the secret.
    with pytest.raises(av.error.FFmpegError):
        av.open(io.BytesIO(hostile_playlists(str(secret))["ffconcat"]), format="concat",
                options={"protocol_whitelist": demuxer_options("mov")["protocol_whitelist"]})
    opts = demuxer_options("mov")
    assert opts["enable_drefs"] == "0" and opts["use_absolute_path"] == "0"


def test_every_accepted_container_decodes():
    frames = [np.full((32, 48, 3), 40 * i, np.uint8) for i in range(4)]
    for codec, fmt in (("libvpx", "webm"), ("mpeg4", "matroska"), ("mpeg4", "avi"), ("libx264", "mov")):
        out = decode_video(encode_video(frames, codec, fmt), max_frames=10)
        assert len(out) >= 3 and out[0].shape == (32, 48, 3), (codec, fmt)


def test_video_decodes_as_a_stream(clip):
    out = decode_video(clip, max_frames=100)
    assert len(out) == 10 and out[0].shape == (48, 64, 3) and out[0].dtype == np.uint8
    assert len(decode_video(clip, max_frames=3)) == 3
    frames = VideoFrames(clip, "mov", max_frames=100, every=4)
    got = []
    while (f := frames.next()) is not None:
        got.append(f)
    assert len(got) == 3 and frames.decoded == 10 and frames.kept == 3
    # only kept frames are converted to RGB: the decoded bytes count 10 decoded pictures (YUV 4:2:0, padded
    # rows at most 2x) and 3 RGB ones, not 10
    rgb = 64 * 48 * 3
    assert 10 * rgb // 2 + 3 * rgb <= frames.decoded_bytes <= 10 * rgb + 3 * rgb


def test_huge_every_decodes_one_frame(clip):
    frames = VideoFrames(clip, "mov", max_frames=600, every=10 ** 9)
    assert frames.next() is not None and frames.next() is None
    assert frames.decoded == 1


def test_frame_cap_stops_decoding(clip):
    frames = VideoFrames(clip, "mov", max_frames=600, every=1, limits=VideoLimits(max_decoded_frames=4))
    while frames.next() is not None:
        pass
    assert frames.decoded == 4 and frames.kept == 4


def test_frames_larger_than_the_header_are_refused():
    data = small_then_large()
    assert av.open(io.BytesIO(data)).streams.video[0].width == 64  # the header says small
    limits = VideoLimits(max_pixels=200_000)
    frames = VideoFrames(data, "matroska", max_frames=100, limits=limits)
    assert frames.next().shape == (48, 64, 3)
    assert frames.next().shape == (48, 64, 3)
    e = raises(frames.next)
    assert e.code is ErrorCode.TOO_MANY_PIXELS
    frames.close()


def test_decoded_bytes_and_time_caps():
    big = encode_video([np.zeros((720, 1280, 3), np.uint8)] * 12, "mpeg4")
    e = raises(decode_video, big, max_frames=100, limits=VideoLimits(max_decoded_bytes=8_000_000))
    assert e.code is ErrorCode.VIDEO_TOO_LARGE and "bytes" in e.message
    e = raises(decode_video, big, max_frames=100, limits=VideoLimits(max_decode_s=1e-4))
    assert e.code is ErrorCode.VIDEO_TOO_LARGE and "s to decode" in e.message


@pytest.mark.slow
def test_bomb_memory_is_bounded_when_streamed():
    """40 frames of 1920x1080 (a few KB): streaming holds one frame, not all of them."""
    bomb = encode_video([np.zeros((1080, 1920, 3), np.uint8)] * 40, "mpeg4")
    assert len(bomb) < 200_000
    tracemalloc.start()
    frames = VideoFrames(bomb, "mov", max_frames=600)
    n = 0
    while (f := frames.next()) is not None:
        n += 1
        del f
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == 40
    assert peak < 3 * 1920 * 1080 * 3, peak  # a list of 40 frames would be 40 of them


def test_corrupt_video_message_is_ours(clip):
    broken = clip[: len(clip) // 2] + os.urandom(2000)
    try:
        decode_video(broken, max_frames=100)
    except ServiceError as e:
        assert e.code in (ErrorCode.INVALID_IMAGE, ErrorCode.TOO_MANY_PIXELS)
        assert all(w not in e.message for w in LIBRARY_WORDS)
    e = raises(decode_video, b"\x00\x00\x00\x18ftypisom" + b"\x00" * 64, max_frames=5)
    assert e.code is ErrorCode.INVALID_IMAGE


# --- upload body limit ------------------------------------------------------------------------------------
def _receive(chunks: list[bytes]):
    it = iter(chunks)

    async def receive():
        try:
            return {"type": "http.request", "body": next(it), "more_body": True}
        except StopIteration:
            return {"type": "http.request", "body": b"", "more_body": False}
    return receive


def test_body_limit_counts_chunks_as_they_arrive():
    async def run():
        lim = BodyLimit(_receive([b"x" * 400] * 10), 1000)
        got = 0
        with pytest.raises(ServiceError) as ei:
            while True:
                got += len((await lim())["body"])
        assert ei.value.code is ErrorCode.MESSAGE_TOO_LARGE and got == 800 and lim.received == 1200
        scope = {"type": "http", "method": "POST", "headers": [], "path": "/", "query_string": b""}
        req = limited_request(Request(scope, _receive([b"y" * 300] * 5)), 1000)
        with pytest.raises(ServiceError):
            await req.body()
        ok = limited_request(Request(scope, _receive([b"y" * 300] * 3)), 1000)
        assert len(await ok.body()) == 900
        declared = dict(scope, headers=[(b"content-length", b"5000")])
        with pytest.raises(ServiceError) as ei:
            limited_request(Request(declared, _receive([])), 1000)
        assert ei.value.code is ErrorCode.MESSAGE_TOO_LARGE
    asyncio.run(run())


# --- decode budget and fair sharing -----------------------------------------------------------------------
class Key:  # stands for a session worker: the gate holds its keys weakly
    pass


def test_cpu_budget_overdraws_then_refills():
    b = CpuBudget(rate=0.5, burst=1.0, now=0.0)
    assert b.wait_s(0.0) == 0
    b.charge(3.0, 0.0)  # one expensive decode overdraws the bucket
    assert b.wait_s(0.0) == pytest.approx(4.0, abs=0.01)
    assert b.wait_s(3.0) > 0 and b.wait_s(4.1) == 0


def test_gate_refuses_an_overdrawn_session_and_not_others():
    from concurrent.futures import ThreadPoolExecutor

    def burn(seconds):
        t0 = time.thread_time()
        while time.thread_time() - t0 < seconds:
            pass
        return seconds

    async def run():
        now = [0.0]
        gate = DecodeGate(ThreadPoolExecutor(2), cpu_s_per_s=0.1, burst_s=0.05, slots=1, clock=lambda: now[0])
        hog, other = Key(), Key()
        assert await gate.run(hog, burn, 0.1) == 0.1
        with pytest.raises(ServiceError) as ei:
            await gate.run(hog, burn, 0.1)
        assert ei.value.code is ErrorCode.DECODE_BUDGET_EXCEEDED and ei.value.fatal is False
        assert ei.value.details["retry_after_s"] > 0
        assert await gate.run(other, burn, 0.01) == 0.01  # another session is unaffected
        now[0] += 10
        assert await gate.run(hog, burn, 0.01) == 0.01  # and the hog recovers
    asyncio.run(run())


def test_gate_caps_concurrent_decodes_per_session():
    from concurrent.futures import ThreadPoolExecutor

    active: dict[str, int] = {"a": 0, "b": 0}
    peak: dict[str, int] = {"a": 0, "b": 0}
    lock = threading.Lock()

    def work(key):
        with lock:
            active[key] += 1
            peak[key] = max(peak[key], active[key])
        time.sleep(0.05)
        with lock:
            active[key] -= 1

    async def run():
        gate = DecodeGate(ThreadPoolExecutor(4), cpu_s_per_s=100, burst_s=100, slots=1)
        a, b = Key(), Key()
        await asyncio.gather(*[gate.run(a, work, "a") for _ in range(6)], gate.run(b, work, "b"))
    asyncio.run(run())
    assert peak == {"a": 1, "b": 1}
