#!/usr/bin/env python3
"""The cost of calling qkv through its Python package: qkv.attention on
NumPy arrays and on torch tensors against the bare library call (ctypes,
views and output built once, outside the timing), same process, same
inputs. Prints the median times and, per shape, the median of the
per-round ratios (the three calls of a round run back to back).

    .venv/bin/python bench/python_api.py      # after `make test`
"""
import argparse
import ctypes
import statistics
import time

import numpy as np

import qkv
from qkv import _lib

try:
    import torch
except ImportError:
    torch = None

SHAPES = [(1, 512, 8, 64), (4, 512, 12, 64), (1, 2048, 12, 128), (1, 4096, 8, 128)]


def interleaved(fns, reps):
    """Median time of each fn and the median of each one's per-round ratio
    to the first: the calls of one round run back to back, so load from
    other processes that drifts over the run cancels out of the ratios."""
    for fn in fns:
        fn()
    ts = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            ts[i].append(time.perf_counter() - t)
    med = [statistics.median(t) for t in ts]
    ratios = [statistics.median(a / b for a, b in zip(t, ts[0])) for t in ts]
    return med, ratios


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    print(f"qkv {qkv.version()} ({qkv.isa(a.threads)}), causal fp32, median of {a.reps}")
    print(f"{'B,S,H,D':18s} {'C call ms':>10s} {'numpy ms':>10s} {'ratio':>6s}"
          + (f" {'torch ms':>10s} {'ratio':>6s}" if torch else ""))
    for B, S, H, D in SHAPES:
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((B, S, H, D), dtype=np.float32) for _ in range(3))
        out = np.empty_like(q)
        views = [qkv._view(x, n) for x, n in ((q, "q"), (k, "k"), (v, "v"), (out, "out"))]
        opts = _lib.lib.qkv_attn_opts_default()
        opts.causal = 1
        ctx = _lib.context(a.threads)
        fwd = _lib.lib.qkv_attention_forward
        args = (ctx, ctypes.byref(views[0]), ctypes.byref(views[1]), ctypes.byref(views[2]),
                ctypes.byref(opts), ctypes.byref(views[3]), None)
        fns = [lambda: fwd(*args),
               lambda: qkv.attention(q, k, v, causal=True, threads=a.threads)]
        if torch:
            tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
            fns.append(lambda: qkv.attention(tq, tk, tv, causal=True, threads=a.threads))
        med, ratio = interleaved(fns, a.reps)
        line = f"{f'{B},{S},{H},{D}':18s} {1e3 * med[0]:10.3f}" + "".join(
            f" {1e3 * m:10.3f} {r:6.3f}" for m, r in zip(med[1:], ratio[1:]))
        print(line, flush=True)


if __name__ == "__main__":
    main()
