"""Decode cost of hostile media (docs/SECURITY.md, "Media and uploads"): peak RSS and CPU of each case, each in a
fresh process (peak RSS = VmHWM), measured in one run.

    .venv/bin/python bench/media.py

Video cases compare the route's streamed decode (one frame held at a time) with collecting every frame in a list
(what the one-shot route did before): the ratio is the memory the streaming saves. `every` compares decoding for
`?every=1000000000` with `?every=1` (frames decoded, CPU). The PNG case is the 16-bit 6324x6324 image of
issue 17 (~80 KB).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from serve_app.media import imaging, video
from serve_app.errors import ServiceError
mode, path, every = sys.argv[2], sys.argv[3], int(sys.argv[4])
data = open(path, "rb").read()
c0, t0 = time.process_time(), time.monotonic()
info = {}
try:
    if mode == "png":
        info["shape"] = list(imaging.decode_image(data, imaging.ImageLimits()).shape)
    else:
        frames = video.VideoFrames(data, video.sniff_container(data), max_frames=600, every=every)
        kept = []
        while (f := frames.next()) is not None:
            if mode == "list":
                kept.append(f)
        info = {"decoded": frames.decoded, "kept": frames.kept}
except ServiceError as e:
    info["error"] = e.code.value
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent across exec
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
peak = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
info |= {"peak_rss_mb": peak,
         "cpu_s": time.process_time() - c0, "wall_s": time.monotonic() - t0}
print(json.dumps(info))
"""


def make_inputs(d: str) -> dict[str, str]:
    import numpy as np
    from PIL import Image

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_media_limits import encode_video, small_then_large

    paths = {"bomb": os.path.join(d, "bomb40.mp4"), "small_large": os.path.join(d, "small_large.mkv"),
             "png16": os.path.join(d, "png16.png")}
    with open(paths["bomb"], "wb") as f:
        f.write(encode_video([np.zeros((2160, 4096, 3), np.uint8)] * 40, "libx264"))
    with open(paths["small_large"], "wb") as f:
        f.write(small_then_large(n_small=2, n_large=30, big=(2160, 4096)))
    buf = io.BytesIO()
    Image.fromarray(np.zeros((6324, 6324), np.uint16)).save(buf, "PNG", optimize=True)
    with open(paths["png16"], "wb") as f:
        f.write(buf.getvalue())
    return paths


def run(mode: str, path: str, every: int = 1) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, ROOT, mode, path, str(every)], capture_output=True,
                         text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    with tempfile.TemporaryDirectory() as d:
        paths = make_inputs(d)
        rows = []
        for case in ("bomb", "small_large"):
            size = os.path.getsize(paths[case])
            listed, streamed = run("list", paths[case]), run("stream", paths[case])
            rows.append((f"{case} ({size / 1e3:.0f} KB)", streamed, listed,
                         listed["peak_rss_mb"] / streamed["peak_rss_mb"]))
        huge, one = run("stream", paths["bomb"], 10 ** 9), run("stream", paths["bomb"], 1)
        png = run("png", paths["png16"])
        png_kb = os.path.getsize(paths["png16"]) / 1e3
    print(f"{'case':<24}{'streamed RSS MB':>16}{'list RSS MB':>13}{'ratio':>7}{'CPU s':>7}  frames decoded/kept")
    for name, s, li, ratio in rows:
        print(f"{name:<24}{s['peak_rss_mb']:>16.0f}{li['peak_rss_mb']:>13.0f}{ratio:>7.2f}{s['cpu_s']:>7.2f}"
              f"  {s.get('decoded')}/{s.get('kept')}")
    print(f"every=1e9 vs every=1: decoded {huge['decoded']} vs {one['decoded']} frames, CPU {huge['cpu_s']:.2f} vs "
          f"{one['cpu_s']:.2f} s ({one['cpu_s'] / max(huge['cpu_s'], 1e-3):.1f}x)")
    print(f"png16 6324x6324 ({png_kb:.0f} KB): peak RSS "
          f"{png['peak_rss_mb']:.0f} MB, CPU {png['cpu_s']:.2f} s, {png.get('shape') or png.get('error')}")


if __name__ == "__main__":
    main()
