"""POST /v1/reconstruct: images or a video in, reconstruction out, through the same pipeline."""

from __future__ import annotations

import io
import json

import av
import httpx
import numpy as np
import pytest

from serve_app.media.imaging import encode_image
from serve_app.recon.exports import read_ply

pytestmark = pytest.mark.ray


def mp4(frames: np.ndarray) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def test_images_to_json_and_ply(serve_url, synthetic_seq):
    files = [("files", (f"f{i}.png", encode_image(synthetic_seq.images[i], "PNG"), "image/png")) for i in range(6)]
    r = httpx.post(serve_url + "/v1/reconstruct", files=files, data={"params": json.dumps({"window_size": 4})},
                   timeout=300)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["state"] == "complete" and body["frames"] == 6 and body["points_total"] > 0
    assert [f["index"] for f in body["trajectory"]] == list(range(6))
    ply = httpx.get(serve_url + body["exports"]["ply"], timeout=60)
    pts, _ = read_ply(ply.content)
    assert len(pts) == body["points_total"]
    r = httpx.post(serve_url + "/v1/reconstruct?format=ply", files=files[:3], timeout=300)
    assert r.status_code == 200 and len(read_ply(r.content)[0]) > 0


def test_video_upload_with_frame_sampling(serve_url, synthetic_seq):
    video = mp4(synthetic_seq.images[:8])
    r = httpx.post(serve_url + "/v1/reconstruct?every=2", files=[("files", ("clip.mp4", video, "video/mp4"))],
                   timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["frames"] == 4 and len(r.json()["trajectory"]) == 4
    glb = httpx.post(serve_url + "/v1/reconstruct?format=glb", files=[("files", ("c.mp4", video, "video/mp4"))],
                     timeout=300)
    assert glb.status_code == 200 and glb.content[:4] == b"glTF"


def test_bad_upload_is_rejected_whole_and_leaves_no_session(serve_url, synthetic_seq):
    before = httpx.get(serve_url + "/ws/sessions").json()["counts"]["total"]
    files = [("files", ("ok.png", encode_image(synthetic_seq.images[0], "PNG"), "image/png")),
             ("files", ("broken.jpg", b"\xff\xd8\xff garbage", "image/jpeg"))]
    r = httpx.post(serve_url + "/v1/reconstruct", files=files, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_IMAGE"
    assert "broken.jpg" in r.json()["error"]["message"]
    # A "video" whose bytes are no supported container never reaches FFmpeg (UNSUPPORTED_FORMAT).
    for files, code in (([], "INVALID_MESSAGE"),
                        ([("files", ("x.mp4", b"not a video", "video/mp4"))], "UNSUPPORTED_FORMAT")):
        r = httpx.post(serve_url + "/v1/reconstruct", files=files or None, data={"a": "b"}, timeout=60)
        assert r.json()["error"]["code"] == code
    r = httpx.post(serve_url + "/v1/reconstruct?format=obj", files=files, timeout=60)
    assert r.status_code == 422
    assert httpx.get(serve_url + "/ws/sessions").json()["counts"]["total"] == before
