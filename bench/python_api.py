#!/usr/bin/env python3
"""The cost of calling qkv through its Python package: qkv.attention on
NumPy arrays and on torch tensors against the bare library call (ctypes,
views and output built once, outside the timing), same process, same
inputs. Prints medians and the ratio for each shape.

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


def median_time(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


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
        t_c = median_time(lambda: fwd(*args), a.reps)
        t_np = median_time(lambda: qkv.attention(q, k, v, causal=True, threads=a.threads),
                           a.reps)
        line = f"{f'{B},{S},{H},{D}':18s} {1e3 * t_c:10.3f} {1e3 * t_np:10.3f} " \
               f"{t_np / t_c:6.3f}"
        if torch:
            tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
            t_t = median_time(lambda: qkv.attention(tq, tk, tv, causal=True,
                                                    threads=a.threads), a.reps)
            line += f" {1e3 * t_t:10.3f} {t_t / t_c:6.3f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
