"""GPU benchmark of the model path, one command on a CUDA machine (it runs on a CPU too, as a smoke test).

    python bench/gpu.py --out results/                      # defaults: small/base/large, 378x504, 6 views
    python bench/gpu.py --device cpu --models da3-small --size 112x154 --views 4 --batches 1,2 \
        --frames 640x480 --compile-batches 1 --budget-s 300   # smoke test

Sections (every ratio comes from numbers measured in this run; random-init networks cost the same compute as
trained ones):
  1 throughput per model size: DA3Runtime.forward_windows (pinned host-to-device copy, bf16 autocast forward,
    copy back) in views/s at each batch size; batching gain = best batch / batch 1; the call split into
    prep (stack, pin, copy, normalise), network, fetch (device to host) and post (numpy per window)
  2 precision: fp32 vs the autocast dtype, da3-small at batch 1 and the largest batch
  3 host<->device: pinned vs pageable copies of the largest batch (uint8 views in, float32 depth+conf out)
  4 service CPU per window (one core, as an ingress thread does it): decode the client's JPEGs, resize, plan,
    integrate (on oracle predictions of the same size: random weights give no geometry), encode DA3P; against
    the GPU's time per window, i.e. how many ingress cores keep one GPU busy; and the size of the session
    snapshot committed after each window
  5 torch.compile (inductor): warm-up seconds and compiled/eager views/s at the compile batch sizes
    (--compile-model, default da3-small; --compile-variants default,scalars)
  0 check: forward_windows equals a plain forward with ordinary copies (with and without pose priors)
  6 --extra-models (e.g. da3-giant), if budget is left
  7 copies A/B: pinned staging + pinned fetch vs the former .pin_memory() + .cpu(), interleaved (--ab-models)
Each section is appended to OUT/gpu_bench.json when it ends, so a run that is cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from measure import fmt, median_time_s, parse_pair, print_table

from serve_app.config import SessionParams
from serve_app.evaluation.synthetic import SceneSpec, render_sequence
from serve_app.media.imaging import decode_image, encode_image
from serve_app.model.oracle import OracleModel
from serve_app.model.preprocess import resize_for_model
from serve_app.model.runtime import DA3Runtime
from serve_app.prediction import WindowRequest
from serve_app.protocol import encode_points
from serve_app.recon.plan import is_world_part_key
from serve_app.recon.reconstruction import FrameInput, StreamReconstructor
from serve_app.sessions.stream_state import INCREMENTAL


class Report:
    """Sections as they finish: printed, and rewritten to OUT/gpu_bench.json."""

    def __init__(self, out: Path | None, started: float, budget_s: float):
        self.out, self.started, self.budget_s = out, started, budget_s
        self.data: dict = {"sections": {}}

    def left_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def add(self, name: str, value) -> None:
        self.data["sections"][name] = value
        self.data["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "gpu_bench.json").write_text(json.dumps(self.data, indent=1, default=float))

    def table(self, title: str, header: list[str], rows: list[list]) -> None:
        print_table(f"{title}  [{time.perf_counter() - self.started:.0f}s]", header,
                    [[fmt(x, ".2f") if isinstance(x, float) else x for x in r] for r in rows])


def window_pool(views: int, h: int, w: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (views, h, w, 3), dtype=np.uint8) for _ in range(n)]


def throughput(rt: DA3Runtime, pool, batches, repeats) -> list[dict]:
    rows = []
    views = pool[0].shape[0]
    for b in batches:
        reqs = [WindowRequest(images=pool[i]) for i in range(b)]
        t = median_time_s(lambda reqs=reqs: rt.forward_windows(reqs), repeats)
        stages = [rt.forward_windows(reqs)[0].timings for _ in range(3)]
        med = {k: statistics.median(s[k] for s in stages) for k in ("prep_ms", "model_ms", "fetch_ms", "post_ms")}
        rows.append({"batch": b, "views_per_s": b * views / t, "ms_per_window": 1000 * t / b,
                     "forward_ms": med["model_ms"], "ms_per_call": 1000 * t, **med})
    return rows


def section_models(rep: Report, args, models, pool, title: str) -> dict:
    results = {}
    for name in models:
        if rep.left_s() < args.min_section_s:
            print(f"skip {name}: {rep.left_s():.0f}s of budget left")
            results[name] = {"skipped": "budget"}
            continue
        t0 = time.perf_counter()
        rt = DA3Runtime(f"random:{name}", device=args.device, amp=args.amp)
        rows = throughput(rt, pool, args.batches, args.repeats)
        base = rows[0]["views_per_s"]
        best = max(rows, key=lambda r: r["views_per_s"])
        results[name] = {"amp": rt.info()["amp"], "parameters": rt.info()["parameters"], "rows": rows,
                         "batching_gain": best["views_per_s"] / base, "best_batch": best["batch"],
                         "peak_mem_gib": (torch.cuda.max_memory_allocated() / 2**30
                                          if rt.device.type == "cuda" else None),
                         "section_s": time.perf_counter() - t0}
        rep.table(f"{title}: {name} ({results[name]['parameters'] / 1e6:.0f}M params, {results[name]['amp']}, "
                  f"{args.views} views of {args.size})",
                  ["batch", "views/s", "ms/window", "vs batch 1", "call ms", "prep", "network", "fetch", "post"],
                  [[r["batch"], r["views_per_s"], r["ms_per_window"], f"{r['views_per_s'] / base:.2f}x",
                    r["ms_per_call"], r["prep_ms"], r["model_ms"], r["fetch_ms"], r["post_ms"]] for r in rows])
        del rt
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    return results


def section_precision(rep: Report, args, pool) -> dict:
    sizes = sorted({args.batches[0], args.batches[-1]})
    out = {}
    eager = DA3Runtime("random:da3-small", device=args.device, amp=args.amp)
    fp32 = DA3Runtime("random:da3-small", device=args.device, amp="fp32")
    fp32.net.load_state_dict(eager.net.state_dict())
    a = throughput(eager, pool, sizes, args.repeats)
    f = throughput(fp32, pool, sizes, args.repeats)
    rows = []
    for ra, rf in zip(a, f):
        out[ra["batch"]] = {"amp_views_per_s": ra["views_per_s"], "fp32_views_per_s": rf["views_per_s"],
                            "amp_over_fp32": ra["views_per_s"] / rf["views_per_s"]}
        rows.append([ra["batch"], rf["views_per_s"], ra["views_per_s"], f"{ra['views_per_s'] / rf['views_per_s']:.2f}x"])
    rep.table(f"2 precision (da3-small): fp32 vs {eager.info()['amp']} autocast", ["batch", "fp32 views/s",
              f"{eager.info()['amp']} views/s", "gain"], rows)
    return {"amp": eager.info()["amp"], "rows": out}


def section_h2d(rep: Report, args, pool) -> dict:
    if not torch.cuda.is_available() or args.device == "cpu":
        return {"skipped": "no CUDA device"}
    batch = np.stack(pool[:args.batches[-1]])
    dev = torch.device("cuda")

    def pinned():
        torch.from_numpy(batch).pin_memory().to(dev, non_blocking=True)
        torch.cuda.synchronize()

    def pageable():
        torch.from_numpy(batch).to(dev)
        torch.cuda.synchronize()

    # The way back: depth + confidence, float32, of the largest batch.
    b, n, h, w = batch.shape[:4]
    outs = [torch.rand(b, n, h, w, device=dev) for _ in range(2)]

    def fetch_pageable():
        [o.cpu().numpy() for o in outs]

    def fetch_pinned():
        hosts = [torch.empty(o.shape, dtype=o.dtype, pin_memory=True) for o in outs]
        for hst, o in zip(hosts, outs):
            hst.copy_(o, non_blocking=True)
        torch.cuda.synchronize()
        [hst.numpy() for hst in hosts]

    def fetch_pinned_copied():  # pinned, then copied into ordinary memory (pinned pages are not held on to)
        hosts = [torch.empty(o.shape, dtype=o.dtype, pin_memory=True) for o in outs]
        for hst, o in zip(hosts, outs):
            hst.copy_(o, non_blocking=True)
        torch.cuda.synchronize()
        [hst.numpy().copy() for hst in hosts]

    tp, tq = median_time_s(pinned, 20), median_time_s(pageable, 20)
    fq, fp, fc = median_time_s(fetch_pageable, 20), median_time_s(fetch_pinned, 20), median_time_s(fetch_pinned_copied, 20)
    mb = batch.nbytes / 1e6
    ob = sum(o.numel() * 4 for o in outs) / 1e6
    rep.table("3 host<->device copies of the largest batch (ms)", ["direction", "MB", "pageable", "pinned",
              "pinned+copy", "pageable GB/s", "pinned GB/s"],
              [["to GPU (uint8 views)", mb, 1000 * tq, 1000 * tp, "-", mb / 1000 / tq, mb / 1000 / tp],
               ["to host (depth+conf)", ob, 1000 * fq, 1000 * fp, 1000 * fc, ob / 1000 / fq, ob / 1000 / fp]])
    return {"mb": mb, "pinned_ms": 1000 * tp, "pageable_ms": 1000 * tq, "out_mb": ob,
            "fetch_pageable_ms": 1000 * fq, "fetch_pinned_ms": 1000 * fp, "fetch_pinned_copied_ms": 1000 * fc}


def section_service_cpu(rep: Report, args, model_results: dict) -> dict:
    """What the ingress does per window on one CPU thread, against the GPU's time per window."""
    cv2.setNumThreads(1)  # as the ingress sets it
    params = SessionParams(process_res=max(args.size), window_size=args.views, overlap=args.overlap)
    fw, fh = args.frames
    windows = args.service_windows
    n = params.window_size + (windows - 1) * params.new_per_window
    spec = SceneSpec(seed=3, num_frames=n, width=fw, height=fh, trajectory="orbit")
    jpegs = [encode_image(img, "JPEG", 90) for img in render_sequence(spec).images]
    oracle = OracleModel(spec, seed=1)
    recon = StreamReconstructor(params)
    times: dict[str, list[float]] = {k: [] for k in ("decode", "resize", "plan", "integrate", "encode")}
    points = 0
    frame_iter = iter(enumerate(jpegs))
    processed_windows = 0
    snap = recon.snapshot()
    while processed_windows < windows:
        per = {k: 0.0 for k in times}
        plan = None
        while plan is None:
            try:
                i, data = next(frame_iter)
            except StopIteration:
                break
            t0 = time.perf_counter()
            rgb = decode_image(data)
            t1 = time.perf_counter()
            img = resize_for_model(rgb, params.process_res).image
            t2 = time.perf_counter()
            recon.add_frame(FrameInput(index=i, frame_id=i, image=img, original_size=(fw, fh), encoded=data))
            plan = recon.next_window()
            t3 = time.perf_counter()
            per["decode"] += t1 - t0
            per["resize"] += t2 - t1
            per["plan"] += t3 - t2
        if plan is None:
            break
        pred = oracle.forward_windows([plan.request()])[0]  # not timed: stands in for the GPU
        t0 = time.perf_counter()
        out = recon.integrate(plan, pred)
        snap = recon.snapshot()  # as the worker takes one after every window, for its commit
        t1 = time.perf_counter()
        encode_points(out.points, out.colors, seq=processed_windows, window=plan.window,
                      frame_ids=[f.frame_id for f in plan.new])
        t2 = time.perf_counter()
        per["integrate"], per["encode"] = t1 - t0, t2 - t1
        points += len(out.points)
        processed_windows += 1
        for k, v in times.items():
            v.append(1000 * per[k])
    # What the worker commits to the session actor after each window besides the points: the (last) snapshot.
    # A context frame's image goes once, with the first commit that carries it (WorldFrame.parts).
    snap_bytes = len(pickle.dumps(snap))
    inc = snap[INCREMENTAL]
    raw = {**snap, INCREMENTAL: {**inc, "new": {
        k: {**v, "encoded": None, "image": resize_for_model(decode_image(v["encoded"]), params.process_res).image}
        if is_world_part_key(k) and v.get("encoded") else v for k, v in inc["new"].items()}}}
    snap_raw_bytes = len(pickle.dumps(raw))
    skip = 1 if len(times["decode"]) > 2 else 0  # the first window anchors the map: not steady state
    med = {k: statistics.median(v[skip:]) for k, v in times.items()}
    cpu_ms = sum(med.values())
    rows, gpu = [], {}
    for name, res in model_results.items():
        if "rows" not in res:
            continue
        for r in (res["rows"][0], max(res["rows"], key=lambda r: r["views_per_s"])):
            cores = cpu_ms / r["ms_per_window"]
            gpu[f"{name}@{r['batch']}"] = {"gpu_ms_per_window": r["ms_per_window"], "cores_to_feed": cores}
            rows.append([name, r["batch"], r["ms_per_window"], cpu_ms, cores])
    rep.table(f"4 service CPU per window ({params.window_size} views, {params.new_per_window} new frames, {fw}x{fh} "
              f"JPEG -> {params.process_res}), medians over {len(times['decode']) - skip} windows, ms: "
              + ", ".join(f"{k} {v:.1f}" for k, v in med.items()),
              ["model", "batch", "GPU ms/window", "CPU ms/window", "cores to feed GPU"], rows)
    print(f"  session snapshot per window: {snap_bytes / 1e6:.2f} MB for {len(snap['world'])} world frames "
          f"({snap_raw_bytes / 1e6:.2f} MB with raw images instead of the client's JPEGs)")
    return {"snapshot_bytes": snap_bytes, "snapshot_raw_image_bytes": snap_raw_bytes, "stage_ms": med, "cpu_ms_per_window": cpu_ms, "points_per_window": points / max(1, processed_windows),
            "new_frames_per_window": params.new_per_window, "vs_gpu": gpu}


class FormerCopies(DA3Runtime):
    """The copies as they were before the pinned staging: np.stack + .pin_memory(), and .cpu() back."""

    def _stack_to_device(self, arrays, dtype=None):
        t = torch.from_numpy(np.stack(arrays).astype(dtype or arrays[0].dtype, copy=False))
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    def _fetch(self, tensors):
        return [None if t is None else t.cpu().numpy() for t in tensors]


def section_check(rep: Report, args) -> dict:
    """forward_windows (pinned staging, pinned fetch) against a plain forward with ordinary copies, with and
    without pose priors: the outputs must match."""
    from serve_app.model.preprocess import normalize_images
    from serve_app.model.runtime import normalize_prior_extrinsics

    rt = DA3Runtime("random:da3-small", device=args.device, amp=args.amp)
    rng = np.random.default_rng(1)
    n, h, w = 3, 112, 154
    K = np.array([[120.0, 0, w / 2], [0, 120.0, h / 2], [0, 0, 1]], np.float32)
    results = {}
    for priors in (False, True):
        reqs = []
        for _ in range(2):
            E = np.repeat(np.eye(4)[None], n, axis=0)
            E[:, :3, 3] = rng.normal(scale=0.1, size=(n, 3))
            reqs.append(WindowRequest(images=rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8),
                                      extrinsics=E if priors else None, intrinsics=np.stack([K] * n) if priors else None))
        preds = rt.forward_windows(reqs)
        dev = rt.device
        with torch.inference_mode(), rt._autocast():
            imgs = normalize_images(torch.from_numpy(np.stack([r.images for r in reqs])).to(dev))
            ext = ixt = None
            if priors:
                ext = normalize_prior_extrinsics(torch.from_numpy(np.stack([r.extrinsics for r in reqs])
                                                                  .astype(np.float32)).to(dev))
                ixt = torch.from_numpy(np.stack([r.intrinsics for r in reqs])).to(dev)
            out = rt.net(imgs, ext, ixt, [], False, False, rt.ref_view_strategy)
        ref = out["depth"].float().cpu().numpy().reshape(2, n, h, w)
        got = np.stack([p.depth for p in preds])
        rel = float(np.abs(got - ref).max() / np.abs(ref).max())
        results["priors" if priors else "plain"] = rel
    ok = all(v < 1e-3 for v in results.values())
    rep.table("0 check: forward_windows vs a plain forward (max abs diff / max depth)", ["case", "rel. diff", "ok"],
              [[k, f"{v:.1e}", "yes" if v < 1e-3 else "NO"] for k, v in results.items()])
    if not ok:
        raise SystemExit("forward_windows disagrees with the plain forward")
    return results


def section_copies_ab(rep: Report, args, pool) -> dict:
    """Pinned staging + pinned fetch (now) vs .pin_memory() + .cpu() (before), interleaved on one network."""
    result = {}
    for name in args.ab_models:
        new = DA3Runtime(f"random:{name}", device=args.device, amp=args.amp)
        old = FormerCopies(f"random:{name}", device=args.device, amp=args.amp)
        old.net = new.net  # same weights, same module
        rows = []
        for b in args.batches:
            runs = {"new": [], "old": []}
            for _ in range(2):  # ABAB: GPU clocks and host memory state drift between runs
                for tag, rt in (("new", new), ("old", old)):
                    runs[tag].append(throughput(rt, pool, [b], args.repeats)[0])
            best = {k: max(v, key=lambda r: r["views_per_s"]) for k, v in runs.items()}
            rows.append({"batch": b, **{f"{k}_{f}": row[f] for k, row in best.items()
                                       for f in ("views_per_s", "prep_ms", "fetch_ms", "model_ms")}})
        result[name] = rows
        rep.table(f"7 copies A/B ({name}): pinned staging + pinned fetch (new) vs pin_memory() + .cpu() (old)",
                  ["batch", "old views/s", "new views/s", "gain", "old prep", "new prep", "old fetch", "new fetch",
                   "network"],
                  [[r["batch"], r["old_views_per_s"], r["new_views_per_s"],
                    f"{r['new_views_per_s'] / r['old_views_per_s']:.2f}x", r["old_prep_ms"], r["new_prep_ms"],
                    r["old_fetch_ms"], r["new_fetch_ms"], r["new_model_ms"]] for r in rows])
        del new, old
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


def section_compile(rep: Report, args, pool) -> dict:
    """Eager vs torch.compile (inductor) on the same weights; variant "scalars" also captures `Tensor.item()`
    (DA3's RoPE calls it, which otherwise splits the graph)."""
    import torch._dynamo

    name = args.compile_model
    eager = DA3Runtime(f"random:{name}", device=args.device, amp=args.amp)
    re_ = throughput(eager, pool, args.compile_batches, args.repeats)
    reqs = [WindowRequest(images=pool[0])]
    ref = eager.forward_windows(reqs)[0].depth
    result = {"model": name, "eager": {r["batch"]: r["views_per_s"] for r in re_}, "variants": {}}
    for variant in args.compile_variants:
        if rep.left_s() < args.min_compile_s:
            print(f"skip compile {variant}: {rep.left_s():.0f}s of budget left")
            result["variants"][variant] = {"skipped": "budget"}
            continue
        torch._dynamo.reset()
        torch._dynamo.config.capture_scalar_outputs = variant == "scalars"
        comp = DA3Runtime(f"random:{name}", device=args.device, amp=args.amp, compile=True,
                          compile_backend="inductor")
        comp.net.load_state_dict(eager.net.state_dict())
        h, w = args.size
        warm = comp.warmup_shapes([(args.views, h, w)], args.compile_batches)
        rc = throughput(comp, pool, args.compile_batches, args.repeats)
        a = comp.forward_windows(reqs)[0].depth
        rel = float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-12))
        rows = [[c["batch"], e["views_per_s"], c["views_per_s"], f"{c['views_per_s'] / e['views_per_s']:.2f}x",
                 c["model_ms"]] for c, e in zip(rc, re_)]
        rep.table(f"5 torch.compile inductor, {variant} ({name}): warm-up {warm:.1f}s for batch sizes "
                  f"{args.compile_batches}; depth rel. diff vs eager {rel:.1e}",
                  ["batch", "eager views/s", "compiled views/s", "gain", "network ms"], rows)
        result["variants"][variant] = {"warmup_s": warm, "depth_rel_diff": rel,
                                       "rows": [{"batch": c["batch"], "compiled": c["views_per_s"],
                                                 "network_ms": c["model_ms"]} for c in rc]}
        del comp
    torch._dynamo.config.capture_scalar_outputs = False
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="folder for gpu_bench.json")
    ap.add_argument("--device", default=None, help="default: cuda if available")
    ap.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    ap.add_argument("--models", default="da3-small,da3-base,da3-large")
    ap.add_argument("--extra-models", default="", help="run after everything else, if budget is left")
    ap.add_argument("--size", default="378x504", help="HxW per view (504 longest side of a 4:3 frame)")
    ap.add_argument("--views", type=int, default=6, help="views per window (the default window_size)")
    ap.add_argument("--overlap", type=int, default=2)
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--compile-batches", default="1,8")
    ap.add_argument("--compile-model", default="da3-small")
    ap.add_argument("--ab-models", default="da3-small,da3-base", help="section 7")
    ap.add_argument("--compile-variants", default="default", help="default and/or scalars, comma separated")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--frames", default="640x480", help="WxH of the client's JPEGs in section 4")
    ap.add_argument("--service-windows", type=int, default=12)
    ap.add_argument("--budget-s", type=float, default=420.0, help="sections that would start later are skipped")
    ap.add_argument("--min-section-s", type=float, default=30.0)
    ap.add_argument("--min-compile-s", type=float, default=150.0)
    ap.add_argument("--skip", default="", help="comma separated section numbers to skip")
    args = ap.parse_args(argv)
    args.size = parse_pair(args.size)
    args.frames = parse_pair(args.frames)
    args.batches = sorted(int(b) for b in args.batches.split(","))
    args.compile_batches = sorted(int(b) for b in args.compile_batches.split(","))
    args.compile_variants = [v for v in args.compile_variants.split(",") if v]
    args.ab_models = [m for m in args.ab_models.split(",") if m]
    skip = {s for s in args.skip.split(",") if s}

    rep = Report(args.out, time.perf_counter(), args.budget_s)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    env = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
           "gpu": torch.cuda.get_device_name(0) if cuda else None, "size": list(args.size), "views": args.views,
           "batches": args.batches}
    rep.add("env", env)
    print("env:", json.dumps(env))
    h, w = args.size
    pool = window_pool(args.views, h, w, max(args.batches))

    models = {}
    if "0" not in skip:
        rep.add("check", section_check(rep, args))
    if "1" not in skip:
        models = section_models(rep, args, [m for m in args.models.split(",") if m], pool, "1 throughput")
        rep.add("throughput", models)
    if "2" not in skip:
        rep.add("precision", section_precision(rep, args, pool))
    if "3" not in skip:
        rep.add("h2d", section_h2d(rep, args, pool))
    if "4" not in skip:
        rep.add("service_cpu", section_service_cpu(rep, args, models))
    if "5" not in skip:
        rep.add("compile", section_compile(rep, args, pool))
    if "7" not in skip:
        rep.add("copies_ab", section_copies_ab(rep, args, pool))
    if args.extra_models:
        extra = section_models(rep, args, args.extra_models.split(","), pool, "6 throughput")
        rep.add("throughput_extra", extra)
    print(f"\ndone in {time.perf_counter() - rep.started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
