"""Hostile media against the real app (docs/SECURITY.md, "Media and uploads"). Every case checks: the documented
code is answered, the server is still healthy, another session is unaffected, and no file outside the upload
was opened (FIFOs at the paths a playlist names: a process that opens one for reading is seen at once)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import websockets
from conftest import SCENE, app_args, deployed
from test_media_limits import encode_video, hostile_playlists, small_then_large

from serve_app.media.imaging import encode_image
from serve_app.protocol import encode_frame_message

pytestmark = pytest.mark.ray

APP = "hostile_media"
LIBRARY_WORDS = ("Errno", "avformat", "avcodec", "returned", "FileNotFound", "InvalidData", "No such file",
                 "Traceback")
MB = 1024 * 1024


@pytest.fixture(scope="module")
def hostile_url(serve_url):
    """Oracle backend (cheap) with small media limits: a video may decode to 150 MB, uploads are 4 MB at most,
    and a session may spend 0.2 CPU s/s decoding images (burst 0.3 s)."""
    args = app_args(model={"backend": "oracle", "oracle_scene": SCENE},
                    limits={"max_upload_bytes": 4_000_000, "max_image_pixels": 10_000_000,
                            "max_video_decoded_bytes": 150_000_000, "max_video_decode_s": 20.0,
                            "decode_cpu_s_per_s": 0.2, "decode_cpu_burst_s": 0.3})
    with deployed(serve_url, APP, args) as url:
        yield url


# --- checks shared by every case ----------------------------------------------------------------------------
def replica_pid() -> int:
    """The hostile app's ingress replica process (Ray titles it ray::ServeReplica:<app>:Ingress)."""
    want = f"ServeReplica:{APP}:Ingress".encode()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if want in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return int(pid)
            except OSError:
                continue
    raise AssertionError("hostile app replica not found")


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def assert_healthy(url: str) -> None:
    r = httpx.get(url + "/healthz", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text


def assert_our_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    for word in LIBRARY_WORDS:
        assert word not in err["message"], err["message"]
    return err


class OpenWatch:
    """FIFOs standing in for server files. A process that opens one for reading blocks there until a writer
    comes, so polling with a non-blocking writer sees every open; the watcher then feeds it the secret, as the
    real file would have been read."""

    def __init__(self, paths: list[Path], secret: str):
        self.paths, self.secret, self.opened = paths, secret, []
        for p in paths:
            p.unlink(missing_ok=True)
            os.mkfifo(p)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for p in self.paths:
                try:
                    fd = os.open(p, os.O_WRONLY | os.O_NONBLOCK)
                except OSError:  # ENXIO: nobody has it open for reading
                    continue
                self.opened.append(str(p))
                try:
                    os.write(fd, self.secret.encode() + b"\n")
                finally:
                    os.close(fd)
            time.sleep(0.005)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for p in self.paths:
            p.unlink(missing_ok=True)


class TcpWatch:
    """A listening socket a playlist points at; records whether anything connected."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


async def bystander(url: str, seq, n: int = 6) -> None:
    """Another session streams scene frames to the end meanwhile: every frame placed, summary complete."""
    r = await http("post", url + "/ws/session/create", json={})
    assert r.status_code == 201, r.text
    sid = r.json()["session_id"]
    msgs = []
    async with websockets.connect(url.replace("http://", "ws://") + f"/ws/reconstruct/{sid}", max_size=None) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
        for i in range(n):
            await ws.send(encode_frame_message(encode_image(seq.images[i], "PNG"), {"frame_id": i}))
        await ws.send(json.dumps({"type": "finalize"}))

        async def read():
            try:
                async for raw in ws:
                    if isinstance(raw, str):
                        msgs.append(json.loads(raw))
            except websockets.ConnectionClosed:
                pass
        await asyncio.wait_for(read(), 120)
    summary = [m for m in msgs if m["type"] == "summary"]
    errors = [m for m in msgs if m["type"] == "error"]
    assert not errors, errors
    assert summary and summary[0]["state"] == "complete" and summary[0]["frames_processed"] == n, msgs[-3:]
    await http("delete", f"{url}/ws/session/{sid}")


async def http(method: str, url: str, **kw) -> httpx.Response:
    """A plain httpx call off the event loop (the websockets in these tests share it)."""
    kw.setdefault("timeout", 30)
    return await asyncio.to_thread(getattr(httpx, method), url, **kw)


def post_files(url: str, files, timeout: float = 120, **params) -> tuple[httpx.Response, float]:
    q = "&".join(f"{k}={v}" for k, v in params.items())
    t0 = time.monotonic()
    r = httpx.post(url + "/v1/reconstruct" + (f"?{q}" if q else ""), files=files, timeout=timeout)
    return r, time.monotonic() - t0


def session_count(url: str) -> int:
    return httpx.get(url + "/ws/sessions", timeout=30).json()["counts"]["total"]


# --- the cases -----------------------------------------------------------------------------------------------
async def test_playlists_read_no_server_file(hostile_url, synthetic_seq, tmp_path):
    """ffconcat naming a file in the replica's cwd and an absolute path: refused from the magic bytes, nothing
    opened, the same answer whether the named file exists or not."""
    secret = f"SECRET=hunter2-{uuid.uuid4().hex[:6]}"
    cwd = Path(os.readlink(f"/proc/{replica_pid()}/cwd"))
    rel = f"leak_{uuid.uuid4().hex[:8]}.nfo"
    watch = OpenWatch([cwd / rel, tmp_path / "abs_secret.nfo"], secret)
    before = session_count(hostile_url)
    try:
        bodies = {
            "relative": f"ffconcat version 1.0\nfile {rel}\n".encode(),
            "absolute": f"ffconcat version 1.0\nfile {tmp_path / 'abs_secret.nfo'}\n".encode(),
            "missing": b"ffconcat version 1.0\nfile no_such_file.nfo\n",
        }

        async def attack():
            answers = {}
            for name, body in bodies.items():
                for fname, ctype in (("x.mp4", "video/mp4"), ("x.mkv", "application/octet-stream")):
                    r, _ = await asyncio.to_thread(post_files, hostile_url, [("files", (fname, body, ctype))])
                    assert secret not in r.text
                    answers[name, fname] = assert_our_error(r, 415, "UNSUPPORTED_FORMAT")["message"]
            # No existence oracle: one answer for present and missing files.
            assert answers["relative", "x.mp4"] == answers["missing", "x.mp4"] == answers["absolute", "x.mp4"]
            # Named as an image, the playlist goes to the image decoder, which opens nothing either.
            r, _ = await asyncio.to_thread(post_files, hostile_url, [("files", ("x.png", bodies["relative"],
                                                                                   "image/png"))])
            assert_our_error(r, 400, "INVALID_IMAGE")
            await asyncio.sleep(0.5)  # a late open would still be seen

        await asyncio.gather(attack(), bystander(hostile_url, synthetic_seq))
        assert watch.opened == []
    finally:
        watch.close()
    assert_healthy(hostile_url)
    assert session_count(hostile_url) == before


async def test_sdp_and_hls_open_no_socket_and_fail_fast(hostile_url, synthetic_seq, tmp_path):
    tcp = TcpWatch()
    secret_file = tmp_path / "hls_secret.ts"
    watch = OpenWatch([secret_file], "SECRET")
    try:
        cases = hostile_playlists(str(secret_file))
        cases["hls_http"] = f"#EXTM3U\n#EXTINF:1,\nhttp://127.0.0.1:{tcp.port}/x.ts\n#EXT-X-ENDLIST\n".encode()
        cases["sdp"] = cases["sdp"].replace(b"5004", str(tcp.port).encode())

        async def attack():
            for name, body in cases.items():
                for fname, ctype in (("clip.mp4", "video/mp4"), ("clip.sdp", "video/x-sdp")):
                    r, took = await asyncio.to_thread(post_files, hostile_url, [("files", (fname, body, ctype))])
                    assert_our_error(r, 415, "UNSUPPORTED_FORMAT")
                    assert took < 5, (name, took)
            await asyncio.sleep(0.5)

        await asyncio.gather(attack(), bystander(hostile_url, synthetic_seq))
        assert tcp.connections == 0 and watch.opened == []
    finally:
        tcp.close()
        watch.close()
    assert_healthy(hostile_url)


async def test_video_bomb_is_streamed_and_capped(hostile_url, synthetic_seq):
    """40 frames of 4096x2160 in a few KB decode to 1.06 GB of RGB: refused with VIDEO_TOO_LARGE once 150 MB
    are decoded, the replica's peak memory barely moves; with a huge `every` only one frame is decoded."""
    bomb = encode_video([np.zeros((2160, 4096, 3), np.uint8)] * 40, "libx264")
    assert len(bomb) < 100_000
    pid = replica_pid()
    hwm0 = peak_rss(pid)

    async def attack():
        r, _ = await asyncio.to_thread(post_files, hostile_url, [("files", ("bomb.mp4", bomb, "video/mp4"))])
        assert_our_error(r, 413, "VIDEO_TOO_LARGE")
        r, _ = await asyncio.to_thread(post_files, hostile_url, [("files", ("bomb.mp4", bomb, "video/mp4"))],
                                       every=10 ** 9)
        assert r.status_code == 200, r.text
        assert len(r.json()["trajectory"]) == 1

    await asyncio.gather(attack(), bystander(hostile_url, synthetic_seq))
    grew = peak_rss(pid) - hwm0
    print(f"replica peak RSS {hwm0 / MB:.0f} -> {peak_rss(pid) / MB:.0f} MB")
    assert grew < 400 * MB, f"replica peak RSS grew {grew / MB:.0f} MB"
    assert_healthy(hostile_url)


async def test_frames_larger_than_the_video_header_are_refused(hostile_url, synthetic_seq):
    """The stream header (and first frames) say 64x48, later frames are 4000x3000, over max_image_pixels (10 MP);
    a damaged video is answered in the project's words, never FFmpeg's."""
    data = small_then_large(big=(3000, 4000))
    r, _ = await asyncio.to_thread(post_files, hostile_url, [("files", ("s.mkv", data, "video/x-matroska"))])
    assert_our_error(r, 413, "TOO_MANY_PIXELS")
    corrupt = encode_video([synthetic_seq.images[i] for i in range(4)], "mpeg4")
    corrupt = corrupt[:48] + bytes(200) + corrupt[48 + 200:]
    r, _ = await asyncio.to_thread(post_files, hostile_url, [("files", ("c.mp4", corrupt, "video/mp4"))])
    if r.status_code != 200:  # FFmpeg may conceal the damage; when it does not, the message is ours
        assert_our_error(r, r.status_code, r.json()["error"]["code"])
    await bystander(hostile_url, synthetic_seq)
    assert_healthy(hostile_url)


async def test_chunked_upload_over_the_limit_is_refused(hostile_url, synthetic_seq):
    """No Content-Length: the body is counted as it arrives and refused past max_upload_bytes (4 MB)."""
    boundary = "hostileboundary"
    sent = [0]

    def body():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n"
               f"Content-Type: image/png\r\n\r\n").encode()
        chunk = b"\0" * 65536
        for _ in range(12 * 16):  # 12 MB
            sent[0] += len(chunk)
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    before = session_count(hostile_url)

    def attack():
        try:
            return httpx.post(hostile_url + "/v1/reconstruct", content=body(), timeout=120,
                              headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        except httpx.HTTPError as exc:  # the server may close while we still send
            return exc

    r, _ = await asyncio.gather(asyncio.to_thread(attack), bystander(hostile_url, synthetic_seq))
    assert isinstance(r, httpx.Response), r
    assert "content-length" not in r.request.headers and r.request.headers.get("transfer-encoding") == "chunked"
    assert_our_error(r, 413, "MESSAGE_TOO_LARGE")
    # Within the limit, a chunked upload works.
    ok = encode_image(synthetic_seq.images[0], "PNG")
    small = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n"
             f"Content-Type: image/png\r\n\r\n").encode() + ok + f"\r\n--{boundary}--\r\n".encode()
    r = await http("post", hostile_url + "/v1/reconstruct", content=iter([small[:100], small[100:]]), timeout=120,
                   headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 200, r.text
    assert session_count(hostile_url) == before + 1
    assert_healthy(hostile_url)


async def test_costly_images_spend_the_session_decode_budget(hostile_url, synthetic_seq):
    """17 KB PNGs of 3000x3000 16-bit pixels cost ~0.2 s of CPU each: the session is refused with
    DECODE_BUDGET_EXCEEDED (not fatal) after its 0.3 s burst, its connection lives on, another session
    streams meanwhile, and after retry_after_s its frames are taken again."""
    buf = io.BytesIO()
    from PIL import Image
    Image.fromarray(np.zeros((3000, 3000), np.uint16)).save(buf, "PNG")
    costly = buf.getvalue()
    assert len(costly) < 50_000
    sid = (await http("post", hostile_url + "/ws/session/create", json={})).json()["session_id"]

    async def hog():
        url = hostile_url.replace("http://", "ws://") + f"/ws/reconstruct/{sid}"
        async with websockets.connect(url, max_size=None) as ws:
            assert json.loads(await ws.recv())["type"] == "ready"

            async def next_text(kind=None, fid=None):
                while True:
                    raw = await asyncio.wait_for(ws.recv(), 60)
                    if isinstance(raw, bytes):  # points of the windows meanwhile
                        continue
                    m = json.loads(raw)
                    if (kind is None or m["type"] in kind) and (fid is None or m.get("frame_id") == fid):
                        return m

            async def answer(fid):
                return await next_text(("ack", "error"), fid)
            refused = None
            for i in range(12):
                await ws.send(encode_frame_message(costly, {"frame_id": i}))
                m = await answer(i)
                if m["type"] == "error":
                    assert m["code"] == "DECODE_BUDGET_EXCEEDED", m
                    refused = m
                    break
            assert refused is not None, "12 costly frames were all decoded"
            assert refused["fatal"] is False and refused["details"]["retry_after_s"] > 0
            await ws.send(json.dumps({"type": "ping", "t": 1}))
            await next_text(("pong",))
            await asyncio.sleep(refused["details"]["retry_after_s"] + 0.2)
            await ws.send(encode_frame_message(encode_image(synthetic_seq.images[0], "PNG"), {"frame_id": "ok"}))
            assert (await answer("ok"))["type"] == "ack"

    await asyncio.gather(hog(), bystander(hostile_url, synthetic_seq))
    await http("delete", f"{hostile_url}/ws/session/{sid}")
    assert_healthy(hostile_url)


async def test_upload_ends_when_its_session_is_deleted(serve_url, synthetic_seq):
    """A one-shot upload waiting for in-flight room (the model is slower than the upload) answers
    SESSION_NOT_FOUND at once when its session is deleted, instead of waiting forever."""
    before = {s["session_id"] for s in (await http("get", serve_url + "/ws/sessions")).json()["sessions"]}
    frames = [encode_image(synthetic_seq.images[i % len(synthetic_seq.images)], "PNG") for i in range(150)]
    files = [("files", (f"f{i}.png", f, "image/png")) for i, f in enumerate(frames)]
    started = {}

    def upload():
        t0 = time.monotonic()
        r = httpx.post(serve_url + "/v1/reconstruct", files=files, timeout=90)
        started["took"] = time.monotonic() - t0
        return r

    async def delete_when_waiting():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for s in (await http("get", serve_url + "/ws/sessions")).json()["sessions"]:
                if s["session_id"] not in before and s["frames_received"] >= 12:  # max_in_flight reached
                    started["deleted_at"] = time.monotonic()
                    assert (await http("delete", f"{serve_url}/ws/session/{s['session_id']}")).status_code == 204
                    return s["session_id"]
            await asyncio.sleep(0.05)
        raise AssertionError("the upload's session never filled its in-flight window")

    t0 = time.monotonic()
    r, sid = await asyncio.gather(asyncio.to_thread(upload), delete_when_waiting())
    assert_our_error(r, 404, "SESSION_NOT_FOUND")
    assert time.monotonic() - t0 < 60
    assert sid not in {s["session_id"] for s in (await http("get", serve_url + "/ws/sessions")).json()["sessions"]}
    assert_healthy(serve_url)
