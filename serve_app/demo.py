"""`make demo`: render the synthetic sample, start `serve run configs/local.yaml`, stream it with the Python
client, write the point cloud, print a summary, stop the server."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from serve_app.evaluation.synthetic import SceneSpec, render_sequence, write_sequence

ROOT = Path(__file__).resolve().parent.parent


def wait_healthy(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll GET {url}/healthz until it answers 200 (used by the demo, the tests and the benchmarks' callers)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"serve run exited with code {proc.returncode}; see its log above")
        try:
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"server at {url} not healthy after {timeout:.0f}s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/local.yaml")
    ap.add_argument("--output", default="out/demo.ply")
    ap.add_argument("--frames", type=int, default=36)
    ap.add_argument("--size", default="320x240", help="sample frame size WxH")
    ap.add_argument("--timeout", type=float, default=600)
    a = ap.parse_args(argv)

    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    w, h = (int(v) for v in a.size.lower().split("x"))
    sample = out.parent / "sample"
    seq = render_sequence(SceneSpec(seed=0, num_frames=a.frames, width=w, height=h))
    write_sequence(seq, sample)
    print(f"[demo] rendered {a.frames} synthetic frames ({w}x{h}) with ground truth into {sample}/")

    cfg = yaml.safe_load(Path(a.config).read_text())
    http = cfg.get("http_options", {})
    url = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"
    serve_bin = Path(sys.executable).with_name("serve")
    log_path = out.parent / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(serve_bin), "run", a.config], stdout=log, stderr=subprocess.STDOUT,
                                cwd=ROOT, env=env, start_new_session=True)
    print(f"[demo] serve run {a.config} (log: {log_path}) ...")
    try:
        wait_healthy(url, a.timeout, proc)
        print(f"[demo] healthy at {url}: {httpx.get(url + '/healthz').json()['model']}")
        t0 = time.time()
        res = subprocess.run([sys.executable, str(ROOT / "clients" / "websocket_client.py"), "--url", url,
                              "--images", str(sample), "--output", str(out),
                              "--trajectory", str(out.with_suffix(".trajectory.json")), "--json"],
                             capture_output=True, text=True, cwd=ROOT, check=False)
        sys.stderr.write(res.stderr[-4000:])
        if res.returncode != 0:
            print(res.stdout)
            print(f"[demo] client failed with exit code {res.returncode}")
            return res.returncode
        summary = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"[demo] streamed in {time.time() - t0:.1f}s: {json.dumps(summary)}")
        print(f"[demo] point cloud written to {out} ({out.stat().st_size} bytes)")
        return 0
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], capture_output=True,
                       check=False)


if __name__ == "__main__":
    raise SystemExit(main())
