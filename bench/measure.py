"""Timing, statistics and table helpers shared by the benchmarks. No network or Ray imports, so `bench/gpu.py` can
use them on a machine that has only torch."""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np


def parse_pair(text: str) -> tuple[int, int]:
    """'AxB' -> (A, B); each script says which of H and W comes first."""
    a, _, b = text.lower().partition("x")
    return int(a), int(b)


def median_time_s(fn, repeats: int) -> float:
    """Median wall time of fn() over `repeats` runs, after one untimed run (first run of a shape)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def pct(values, q: float) -> float:
    """q-th percentile (0..100), NaN for no data."""
    v = [x for x in values if x is not None]
    return float(np.percentile(v, q)) if v else float("nan")


def mean(values) -> float:
    v = [x for x in values if x is not None]
    return float(statistics.fmean(v)) if v else float("nan")


def fmt(x: float, spec: str = ".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n## {title}", flush=True)
    for n, r in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths), flush=True)
