"""The Python CLI end to end against the real app: images and a video in, PLY and trajectory out; errors exit
non-zero with the server's code."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import av
import pytest

from serve_app.evaluation.synthetic import write_sequence
from serve_app.recon.exports import read_ply

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, str(ROOT / "clients" / "websocket_client.py")]
pytestmark = pytest.mark.ray


def run(*args, timeout=300):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_cli_streams_images_and_writes_outputs(serve_url, synthetic_seq, tmp_path):
    write_sequence(synthetic_seq, tmp_path / "frames")
    out, traj = tmp_path / "out.ply", tmp_path / "traj.json"
    r = run("--url", serve_url, "--images", tmp_path / "frames", "--output", out, "--trajectory", traj,
            "--max-frames", 9, "--window", 5, "--overlap", 2, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["frames_sent"] == 9 and summary["frames_processed"] == 9 and summary["poses"] == 9
    pts, _cols = read_ply(out)
    assert len(pts) == summary["points_total"] > 0
    frames = json.loads(traj.read_text())["frames"]
    assert len(frames) == 9


def test_cli_video_with_sampling(serve_url, synthetic_seq, tmp_path):
    video = tmp_path / "clip.mp4"
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 154, 112, "yuv420p"
        for f in synthetic_seq.images[:12]:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    video.write_bytes(buf.getvalue())
    r = run("--url", serve_url, "--video", video, "--every", 2, "--output", tmp_path / "v.ply", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["frames_processed"] == 6


def test_cli_reports_server_error_codes(serve_url, tmp_path):
    (tmp_path / "a.png").write_bytes(b"\x89PNG")  # never sent: the session is refused first
    r = run("--url", serve_url, "--images", tmp_path, "--window", 1)
    assert r.returncode != 0 and "INVALID_PARAMS" in (r.stdout + r.stderr)
    r = run("--url", "http://127.0.0.1:9", "--images", tmp_path, timeout=60)  # nothing listens on port 9
    assert r.returncode != 0
