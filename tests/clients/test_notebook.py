"""Runs notebooks/stream_reconstruction.ipynb top to bottom with nbclient against the real Serve app."""

from __future__ import annotations

import base64
import json
import re
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from serve_app.recon.exports import read_ply

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "stream_reconstruction.ipynb"
PLOTLY_MIME = "application/vnd.plotly.v1+json"
NUM_FRAMES = 10

pytestmark = pytest.mark.ray


def _kernel_in(prefix: Path) -> str:
    """Register a kernelspec that runs this interpreter, so the notebook sees the venv whatever jupyter finds."""
    from ipykernel.kernelspec import install

    name = "da3-notebook-test"
    install(kernel_name=name, display_name="da3 test kernel", prefix=str(prefix))
    spec = json.loads((prefix / "share" / "jupyter" / "kernels" / name / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    return name


def _length(values) -> int:
    """Length of a plotly JSON array: a list, or a typed array {"dtype", "bdata"} (plotly >= 6)."""
    if isinstance(values, dict):
        return len(np.frombuffer(base64.b64decode(values["bdata"]), dtype=np.dtype(values["dtype"])))
    return len(values)


def _outputs(nb) -> list[dict]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]


def _stream_text(nb) -> str:
    return "".join(out.get("text", "") for out in _outputs(nb) if out.get("output_type") == "stream")


def test_notebook_runs_unattended(serve_url, tmp_path, monkeypatch):
    kernel = _kernel_in(tmp_path / "kernel")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "kernel" / "share" / "jupyter"))
    monkeypatch.setenv("DA3_URL", serve_url)
    monkeypatch.setenv("DA3_NUM_FRAMES", str(NUM_FRAMES))
    monkeypatch.delenv("DA3_TOKEN", raising=False)
    monkeypatch.delenv("DA3_VIDEO", raising=False)
    # Run in a scratch directory: the notebook's relative OUTPUT ("out/notebook.ply") lands there.
    workdir = tmp_path / "run"
    workdir.mkdir()

    nb = nbformat.read(NOTEBOOK, as_version=4)
    try:
        NotebookClient(nb, timeout=300, startup_timeout=120, kernel_name=kernel,
                       resources={"metadata": {"path": str(workdir)}}).execute()
    finally:
        nbformat.write(nb, workdir / "executed.ipynb")  # to inspect a failure

    errors = [out for out in _outputs(nb) if out.get("output_type") == "error"]
    assert not errors, errors
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code"), "a cell did not run"

    ply = workdir / "out" / "notebook.ply"
    points, colors = read_ply(ply)
    assert len(points) > 0 and np.isfinite(points).all()
    assert colors.shape == points.shape

    traj = json.loads((workdir / "out" / "notebook.trajectory.json").read_text())
    assert traj["convention"] == "OpenCV camera-to-world"
    assert 0 < len(traj["frames"]) <= NUM_FRAMES
    assert all(np.asarray(f["pose"]).shape == (4, 4) for f in traj["frames"])

    # The live 3D view is updated in place: its final state must hold the streamed points and cameras.
    figures = [out["data"][PLOTLY_MIME] for out in _outputs(nb) if PLOTLY_MIME in out.get("data", {})]
    scenes = [f for f in figures if any(t.get("type") == "scatter3d" for t in f["data"])]
    assert scenes, "no 3D plotly figure in the outputs"
    traces = {t["name"].split(" (")[0]: t for t in scenes[0]["data"]}
    assert 0 < _length(traces["points"]["x"]) <= len(points)
    assert _length(traces["camera path"]["x"]) == len(traj["frames"])
    assert any(t.get("type") == "scatter" for f in figures for t in f["data"]), "no camera path / latency plot"

    text = _stream_text(nb)
    assert "Reconstruction summary" in text
    assert f"{NUM_FRAMES} of {NUM_FRAMES} processed" in text
    assert f"{len(points):,} streamed" in text
    # the notebook compares its (corrected) cloud with the server's export: the same up to float16 on the wire
    gap = re.search(r"max \|streamed - exported\| (\S+) \(scene extent (\S+)\)", text)
    assert gap and float(gap[1]) <= 2e-3 * (1 + float(gap[2])), text[-800:]
    assert "corrections  0 applied" in text  # the default session has no global optimisation
