#!/usr/bin/env python3
"""Decode benchmark: qkv's KV-cache attention against the machine's memory
bandwidth and its peers, one process.

Each row is a decoding step: Sq new queries per sequence against a cache of
Sk positions (Hq query heads sharing Hkv kv heads). The caches are torch
tensors in qkv_alloc memory (transparent huge pages, as the triad's arrays);
qkv runs qkv_attention_kvcache on those [B,Hkv,Sk,D] tensors (strided
views, the same memory torch reads), qkv_attention_paged on a paged copy of that
cache (blocks of 16 positions in shuffled order, written by
qkv_paged_append; int8 with per-row scales in the last column), and
qkv_attention_forward with the same tensors (the prefill kernel, for
comparison); torch runs scaled_dot_product_attention with a [B,Hq,Sq,D]
query, and ggml's flash attention (ggml-python, where it installs) on the
same cache memory. Every output is checked against a float64 reference
before it is timed. The memory bandwidth is qkv_peak_bandwidth (a STREAM triad on the
same threads), measured before and after the rows; the higher is quoted.

    python bench/decode.py --lib build/libqkv.so [--shapes B,Sq,Sk,Hq,Hkv,D ...]
        [--dtypes bf16,f32] [--threads N] [--no-varlen] [--write-doc]

A last line times packed variable-length prefill (cu_seqlens) against the
same sequences in separate calls and against one padded batch.

--write-doc rewrites the section between <!-- decode:begin --> and
<!-- decode:end --> in docs/PERFORMANCE.md.
"""
import argparse
import ctypes
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
import weakref

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the forward benchmark: bindings, timing, reference)
from docsection import write_section  # noqa: E402
from bench import (QKV_DTYPE, TORCH_DTYPE, Qkv, QkvOpts, QkvTensor, Shape,  # noqa: E402
                   fmt_ms, fmt_x, measure, wrap)

import torch  # noqa: E402

DOC = bench.DOC
BEGIN, END = "<!-- decode:begin -->", "<!-- decode:end -->"
KV_I8 = 16                 # QKV_KV_I8 in qkv.h
STREAM_COPY, STREAM_READ = 1, 2   # qkv_stream in qkv.h
BLOCK = 16                 # positions per block of the paged rows
ROUNDS = 9                 # timing rounds per row
MIN_ROUND_S = 0.005        # short calls repeat within a round to last this long
L3_NOTE = "fits the L3 cache"

DEFAULT = [bench.S(x) for x in (
    "1,1,8192,32,8,128",     # 32 MiB of bf16 K+V: the size of this machine's L3
    "1,1,32768,32,8,128",
    "8,1,8192,32,8,128",
    "8,1,16384,32,8,128",
    "1,4,32768,32,8,128",    # speculative decoding: 4 queries per sequence
)]


class PagedCache(ctypes.Structure):
    _fields_ = [("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
                ("k_scale", ctypes.c_void_p), ("v_scale", ctypes.c_void_p),
                ("dtype", ctypes.c_int), ("n_blocks", ctypes.c_int64),
                ("block_size", ctypes.c_int64), ("heads_kv", ctypes.c_int64),
                ("head_dim", ctypes.c_int64), ("head_dim_v", ctypes.c_int64),
                ("head_major", ctypes.c_int)]


def bind(qkv):
    """The decode entry points of qkv.h on qkv's library."""
    P, T = ctypes.POINTER, ctypes.POINTER(QkvTensor)
    i32 = P(ctypes.c_int32)
    sig = {
        "qkv_attention_kvcache": ([ctypes.c_void_p, T, T, T, i32, P(QkvOpts), T,
                                   P(ctypes.c_float)], ctypes.c_int),
        "qkv_attention_paged": ([ctypes.c_void_p, T, P(PagedCache), i32, ctypes.c_int64, i32,
                                 P(QkvOpts), T, P(ctypes.c_float)], ctypes.c_int),
        "qkv_paged_append": ([ctypes.c_void_p, P(PagedCache), i32, ctypes.c_int64, i32, T, T],
                             ctypes.c_int),
        "qkv_peak_bandwidth": ([ctypes.c_void_p], ctypes.c_double),
        "qkv_memory_bandwidth": ([ctypes.c_void_p, ctypes.c_int], ctypes.c_double),
        "qkv_alloc": ([ctypes.c_size_t], ctypes.c_void_p),
        "qkv_free": ([ctypes.c_void_p], None),
    }
    for name, (args, res) in sig.items():
        fn = getattr(qkv.lib, name)
        fn.argtypes, fn.restype = args, res


def check(qkv, st):
    if st:
        raise RuntimeError(f"{qkv.lib.qkv_status_string(st).decode()}: "
                           f"{qkv.lib.qkv_ctx_last_error(qkv.ctx).decode()}")


def cache_tensor(qkv, shape, dtype):
    """An uninitialized torch tensor in qkv_alloc memory (transparent huge
    pages from 2 MiB up): every cache of the benchmark lives there, and
    torch and qkv read the same memory."""
    n = 1
    for d in shape:
        n *= d
    nbytes = max(n * torch.empty(0, dtype=dtype).element_size(), 1)
    ptr = qkv.lib.qkv_alloc(nbytes)
    if not ptr:
        raise MemoryError(f"qkv_alloc({nbytes})")
    buf = (ctypes.c_char * nbytes).from_address(ptr)
    weakref.finalize(buf, qkv.lib.qkv_free, ptr)
    return torch.frombuffer(buf, dtype=dtype, count=n).reshape(shape)


def i32p(t):
    return ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_int32))


def paged_copy(qkv, shape, dtype, k, v, int8, head_major=False):
    """A paged cache holding k, v ([B,Hkv,Sk,D] torch tensors) in shuffled
    blocks (position-major, or head-major inside a block), written by
    qkv_paged_append; returns what must stay alive."""
    nb = -(-shape.Sk // BLOCK)
    n_blocks = shape.B * nb
    perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(7))
    table = perm.to(torch.int32).reshape(shape.B, nb).contiguous()
    kdt = torch.int8 if int8 else TORCH_DTYPE[dtype]
    pk = cache_tensor(qkv, (n_blocks, BLOCK, shape.Hkv, shape.D), kdt)
    pv = cache_tensor(qkv, (n_blocks, BLOCK, shape.Hkv, shape.D), kdt)
    ks = vs = None
    c = PagedCache()
    c.k, c.v = pk.data_ptr(), pv.data_ptr()
    if int8:
        ks = torch.empty(n_blocks, BLOCK, shape.Hkv)
        vs = torch.empty_like(ks)
        c.k_scale, c.v_scale = ks.data_ptr(), vs.data_ptr()
    c.dtype = KV_I8 if int8 else QKV_DTYPE[dtype]
    c.n_blocks, c.block_size, c.heads_kv = n_blocks, BLOCK, shape.Hkv
    c.head_dim = c.head_dim_v = shape.D
    c.head_major = int(head_major)
    zero = torch.zeros(shape.B, dtype=torch.int32)
    kn, vn = qkv.view(k, dtype), qkv.view(v, dtype)
    check(qkv, qkv.lib.qkv_paged_append(qkv.ctx, ctypes.byref(c), i32p(table), nb, i32p(zero),
                                        ctypes.byref(kn), ctypes.byref(vn)))
    return c, table, (pk, pv, ks, vs)


def decode_inputs(qkv, shape, dtype, seed):
    """A random [B,Hq,Sq,D] query and [B,Hkv,Sk,D] K and V caches in
    qkv_alloc memory, in the row's dtype."""
    gen = torch.Generator().manual_seed(seed)
    tdt = TORCH_DTYPE[dtype]
    q = torch.randn(shape.B, shape.Hq, shape.Sq, shape.D, generator=gen).to(tdt)
    k = cache_tensor(qkv, (shape.B, shape.Hkv, shape.Sk, shape.D), tdt)
    v = cache_tensor(qkv, (shape.B, shape.Hkv, shape.Sk, shape.D), tdt)
    k.copy_(torch.randn(shape.B, shape.Hkv, shape.Sk, shape.D, generator=gen))
    v.copy_(torch.randn(shape.B, shape.Hkv, shape.Sk, shape.D, generator=gen))
    return q, k, v


def kvcache_runner(qkv, dtype, q, k, v, lens, opts):
    """qkv_attention_kvcache on torch [B,H,S,D] tensors (read as strided
    views): the runner and its output."""
    out = torch.empty_like(q)
    views = [qkv.view(t, dtype) for t in (q, k, v, out)]
    args = (qkv.ctx, *(ctypes.byref(x) for x in views[:3]), i32p(lens), ctypes.byref(opts),
            ctypes.byref(views[3]), None)
    return qkv.runner(qkv.lib.qkv_attention_kvcache, args, (q, k, v, out, lens)), out


def rows_for(qkv, ggml, shape, dtype, reps):
    tdt = TORCH_DTYPE[dtype]
    q, k, v = decode_inputs(qkv, shape, dtype, 11)
    causal = shape.Sq > 1          # new queries see the cache and each other
    cshape = Shape(shape.B, shape.Sq, shape.Sk, shape.Hq, shape.Hkv, shape.D, causal)
    ref = bench.reference(cshape, q, k, v)
    limit = bench.bound(dtype, v)
    error = lambda got: bench.max_error(cshape, got, ref)
    lens = torch.full((shape.B,), shape.Sk, dtype=torch.int32)
    opts = qkv.lib.qkv_attn_opts_default()
    opts.causal = int(causal)
    preps = {}

    def prep_kvcache():
        run, out = kvcache_runner(qkv, dtype, q, k, v, lens, opts)
        return run, lambda: out
    preps["kvcache"] = prep_kvcache

    def prep_kvcache_pm():
        # the same cache copied to qkv's own [B,Sk,Hkv,D] (position-major) layout
        kp, vp = (cache_tensor(qkv, (shape.B, shape.Sk, shape.Hkv, shape.D), tdt)
                  for _ in range(2))
        kp.copy_(k.transpose(1, 2))
        vp.copy_(v.transpose(1, 2))
        run, out = kvcache_runner(qkv, dtype, q, kp.transpose(1, 2), vp.transpose(1, 2), lens,
                                  opts)
        return run, lambda: out
    preps["kvcache_pm"] = prep_kvcache_pm

    def paged(int8, head_major=False):
        def prep():
            c, table, keep = paged_copy(qkv, cshape, dtype, k, v, int8, head_major)
            out = torch.empty_like(q)
            qv, ov = qkv.view(q, dtype), qkv.view(out, dtype)
            args = (qkv.ctx, ctypes.byref(qv), ctypes.byref(c), i32p(table), table.shape[1],
                    i32p(lens), ctypes.byref(opts), ctypes.byref(ov), None)
            return qkv.runner(qkv.lib.qkv_attention_paged, args, (q, out, table, lens, keep, c)), \
                lambda: out
        return prep
    preps["paged"], preps["paged_hm"] = paged(False), paged(False, True)
    preps["paged_i8"] = paged(True)

    def prep_forward():
        out = torch.empty_like(q)
        return qkv.call(qkv.lib.qkv_attention_forward, q, k, v, out, dtype, causal), lambda: out
    preps["forward"] = prep_forward
    # int8 rounds each element by up to 1/254 of its row's largest
    # magnitude: its bound is bf16's
    limits = {key: 3e-2 if key == "paged_i8" else limit for key in preps}
    res = interleaved(preps, error, limits, reps)
    # torch last and on its own: its OpenMP workers keep spinning for a
    # while after a call, which would slow whatever ran next
    res["sdpa"] = measure(lambda: bench.prep_sdpa(cshape, dtype, q, k, v), error, limit, reps)
    time.sleep(0.3)      # ... and the next row's
    if ggml is not None and ggml.error is None:
        # ggml_flash_attn_ext on the same [B,Hkv,Sk,D] cache memory; its
        # thread pool is freed before the next row
        try:
            res["ggml"] = measure(lambda: ggml.prepare(cshape, dtype, q, k, v), error, limit,
                                  reps)
        finally:
            ggml.release()
    else:
        res["ggml"] = bench.Result()   # the header says why it did not run
    return res


def interleaved(preps, error, limits, reps):
    """Checks each implementation (as bench.measure does), then times them
    in rounds, one run of each per round in rotating order, so that load
    from other processes falls on all of them alike; medians per
    implementation."""
    res, runs, batch = {}, {}, {}
    for key, prep in preps.items():
        r = res[key] = bench.Result()
        try:
            run, result = prep()
            t0 = time.perf_counter()
            run()                                    # warm-up, and the checked output
            batch[key] = max(1, int(MIN_ROUND_S / max(time.perf_counter() - t0, 1e-6)))
            r.err = error(result())
            r.bad = not r.err <= limits[key]
            if r.bad:
                r.note = f"error {r.err:.2g} over the bound {limits[key]:.2g}"
            runs[key] = run
        except Exception as e:  # noqa: BLE001 - a failing implementation gets n/a
            first = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
            r.note = f"{type(e).__name__}: {first}"
    times = {key: [] for key in runs}
    keys = list(runs)
    for n in range(reps or ROUNDS):
        for key in keys[n % len(keys):] + keys[:n % len(keys)]:
            t0 = time.perf_counter()
            for _ in range(batch[key]):
                runs[key]()
            times[key].append((time.perf_counter() - t0) / batch[key])
    for key in keys:
        res[key].ms = statistics.median(times[key]) * 1e3
    return res


# ---- decode beside the triad, round by round -----------------------------------

PAIRED_SHAPE = "1,1,32768,32,8,128"


PAIRED_WARMUP = 10   # untimed decode calls after each triad
EVICT_MB = 128       # other memory read before each timed call of the second pairs,
                     # at least: twice the L3 cache where that is larger (evict_mb)


def l3_bytes():
    """The L3 cache's size from sysfs (0 where it is not reported)."""
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for name in sorted(os.listdir(root)):
            d = os.path.join(root, name)
            with open(os.path.join(d, "level")) as f:
                if f.read().strip() != "3":
                    continue
            with open(os.path.join(d, "size")) as f:
                text = f.read().strip()
            unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            return int(text.rstrip("KMG")) * unit
    except (OSError, ValueError):
        pass
    return 0


def evict_mb():
    """MB of other memory read before each timed call from memory: EVICT_MB,
    or twice the L3 cache where that is larger (a Xeon's L3 of 480 MiB keeps
    much of a 134 MB cache through 128 MB of other reads)."""
    return max(EVICT_MB, 2 * l3_bytes() >> 20)


def paired(qkv, shape, dtype, rounds, evict=None):
    """Alternates the triad and kvcache decode calls for `rounds` rounds, so
    that each decode time has a bandwidth measured a moment before it: the
    memory bandwidth of a shared host moves between levels from one minute
    to the next. After each triad PAIRED_WARMUP calls run untimed: on this
    host the first calls after a triad run 10-20% slower and reach their
    steady speed within about ten calls (30 ms), and decoding steps run back
    to back. With evict (an array far larger than the L3 cache) it is read
    through before each timed call, as a model's other layers would between
    steps, so that no part of the cache is left in the L3 from the call
    before. Returns [(triad GB/s, decode GB/s)] per round."""
    q, k, v = decode_inputs(qkv, shape, dtype, 12)
    lens = torch.full((shape.B,), shape.Sk, dtype=torch.int32)
    opts = qkv.lib.qkv_attn_opts_default()
    run, _ = kvcache_runner(qkv, dtype, q, k, v, lens, opts)
    run()
    pairs = []
    for _ in range(rounds):
        bw = qkv.lib.qkv_peak_bandwidth(qkv.ctx)
        for _ in range(PAIRED_WARMUP):
            run()
        times = []
        for _ in range(5):
            if evict is not None:
                int(evict.sum())
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        pairs.append((bw, kv_bytes(shape, dtype) / statistics.median(times) * 1e-9))
    return pairs


def evict_array(qkv):
    """evict_mb() MB of qkv_alloc memory as an int64 numpy array (its sum
    reads it on one thread)."""
    t = cache_tensor(qkv, (evict_mb() << 17,), torch.int64)
    t.fill_(1)
    return t.numpy()


def paired_summary(pairs):
    """The rounds split at the median triad: (triad, decode, decode/triad)
    medians of the lower and the upper half, and of all."""
    ranked = sorted(pairs)
    half = len(ranked) // 2
    parts = {"all": ranked, "lower": ranked[:half], "upper": ranked[half:]}
    return {name: tuple(statistics.median(x) for x in
                        ([t for t, _ in p], [d for _, d in p], [d / t for t, d in p]))
            for name, p in parts.items() if p}


# ---- packed variable-length prefill ------------------------------------------

VARLEN = (1500, 37, 800, 2048, 5, 300, 1024, 129)   # lengths of the packed sequences
VARLEN_HEADS = (16, 4, 128)                         # Hq, Hkv, D


def tensor(t, dtype):
    """A contiguous torch [B,S,H,D] tensor as a qkv view."""
    v = QkvTensor()
    v.data, v.dtype = t.data_ptr(), QKV_DTYPE[dtype]
    v.shape[:] = list(t.shape)
    v.stride[:] = list(t.stride())
    return v


def varlen_row(qkv, dtype, reps):
    """Causal prefill of VARLEN packed through cu_seqlens, against the same
    sequences one call each and against one padded batch: packed should
    cost the sum of its sequences, not B times the longest."""
    Hq, Hkv, D = VARLEN_HEADS
    tdt = TORCH_DTYPE[dtype]
    gen = torch.Generator().manual_seed(5)
    total = sum(VARLEN)
    q = torch.randn(1, total, Hq, D, generator=gen).to(tdt)
    k = torch.randn(1, total, Hkv, D, generator=gen).to(tdt)
    v = torch.randn(1, total, Hkv, D, generator=gen).to(tdt)
    out = torch.empty_like(q)
    cu = torch.tensor([0, *torch.tensor(VARLEN).cumsum(0).tolist()], dtype=torch.int32)

    def call(opts, views):
        args = (qkv.ctx, *(ctypes.byref(x) for x in views[:3]), ctypes.byref(opts),
                ctypes.byref(views[3]), None)
        return qkv.runner(qkv.lib.qkv_attention_forward, args, (q, k, v, out, cu, opts))

    opts = qkv.lib.qkv_attn_opts_default()
    opts.causal = 1
    opts.cu_seqlens_q = opts.cu_seqlens_k = cu.data_ptr()
    opts.n_seqs = len(VARLEN)
    packed = call(opts, [tensor(t, dtype) for t in (q, k, v, out)])
    plain = qkv.lib.qkv_attn_opts_default()
    plain.causal = 1
    singles = []
    for s in range(len(VARLEN)):
        a, b = int(cu[s]), int(cu[s + 1])
        singles.append(call(plain, [tensor(t[:, a:b], dtype) for t in (q, k, v, out)]))
    n, S = len(VARLEN), max(VARLEN)
    pq = torch.zeros(n, S, Hq, D, dtype=tdt)
    pk = torch.zeros(n, S, Hkv, D, dtype=tdt)
    po = torch.empty_like(pq)
    padded = call(plain, [tensor(t, dtype) for t in (pq, pk, pk, po)])
    for run in (packed, padded, *singles):
        run()                                                       # warm-up
    # in rounds that run each call once, so that load from other processes
    # and the clock's drift fall on all of them alike (timed one after
    # another, packed read up to 1.1x the separate calls' total; in
    # rounds, within noise of it)
    runs = [packed, padded, *singles]
    times = [[] for _ in runs]
    for _ in range(max(reps, ROUNDS)):
        for t, run in zip(times, runs):
            t0 = time.perf_counter()
            run()
            t.append(time.perf_counter() - t0)
    med = [statistics.median(t) * 1e3 for t in times]
    return {"packed": med[0], "padded": med[1], "separate": sum(med[2:])}


def kv_bytes(shape, dtype, int8=False):
    if int8:       # codes, plus one fp32 scale per row of K and of V
        return 2 * shape.B * shape.Hkv * shape.Sk * (shape.D + 4)
    return shape.kv_bytes(dtype)


def cache_note(shape, dtype, l3):
    return f" ({L3_NOTE})" if l3 and kv_bytes(shape, dtype) <= l3 else ""


def l3_bytes():
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            s = f.read().strip()
        return int(s[:-1]) * {"K": 1 << 10, "M": 1 << 20}[s[-1]]
    except (OSError, ValueError, KeyError):
        return None


COLS = ("kvcache", "kvcache_pm", "paged", "paged_hm", "paged_i8", "forward", "sdpa", "ggml")
TITLE = {"kvcache": "qkv kvcache", "kvcache_pm": "qkv kvcache pm", "paged": "qkv paged",
         "paged_hm": "qkv paged hm",
         "paged_i8": "qkv paged int8",
         "forward": "qkv forward", "sdpa": "torch SDPA", "ggml": "ggml FA"}


def cell(res, key, base):
    r = res[key]
    if r.ms is None:
        return "n/a"
    if r.bad:
        return fmt_ms(r.ms) + " (err!)"
    if key == "kvcache" or base.ms is None or base.bad:
        return fmt_ms(r.ms)
    return f"{fmt_ms(r.ms)} ({fmt_x(r.ms / base.ms)})"


def gbs(shape, dtype, r, int8=False):
    return kv_bytes(shape, dtype, int8) / r.ms / 1e6 if r.ms and not r.bad else None


def markers(isa):
    """The section a run writes: sets with AVX-512 keep the main table; a
    machine without (kernel set avx2 or generic) has a section of its own,
    so the doc keeps both kinds of machine."""
    if isa.startswith(("avx512", "amx")):
        return BEGIN, END
    return f"<!-- decode-{isa}:begin -->", f"<!-- decode-{isa}:end -->"


def pair_text(pair):
    """A paired_summary in words."""
    lo, hi, al = pair.get("lower"), pair.get("upper"), pair["all"]
    text = (f"triad {al[0]:.1f} GB/s, decode {al[1]:.1f} GB/s, decode/triad "
            f"{100 * al[2]:.0f}%")
    if lo and hi:
        text += (f"; the rounds with the lower half of the triads: triad {lo[0]:.1f}, "
                 f"decode {lo[1]:.1f} GB/s ({100 * lo[2]:.0f}%); the upper half: triad "
                 f"{hi[0]:.1f}, decode {hi[1]:.1f} GB/s ({100 * hi[2]:.0f}%)")
    return text


def markdown(meta, rows, l3, varlen, pair=None, rounds=0, pair_mem=None):
    begin, end = markers(meta["isa"])
    L = [begin,
         "<!-- Generated by bench/decode.py --write-doc: edit the script, not this section. -->",
         "",
         f"### Decode beside the memory bandwidth and torch, {meta['threads']} threads"
         + ("" if begin == BEGIN else f", kernel set `{meta['isa']}`")
         + f" ({meta['date']})",
         "",
         wrap(f"Machine: {meta['model']}, {meta['cores']} cores, L3 "
              f"{(l3 or 0) >> 20} MiB. qkv {meta['qkv']}, kernel set `{meta['isa']}`; "
              f"STREAM triad (`qkv_peak_bandwidth`, same threads) measured before and "
              f"after each row, the higher of the two quoted with the row "
              f"({min(r[3] for r in rows):.1f}–{max(r[3] for r in rows):.1f} GB/s); "
              f"at the end a read-only loop (`qkv_memory_bandwidth`, `QKV_STREAM_READ`) "
              f"read {meta['read']:.1f} GB/s and a copy {meta['copy']:.1f}. "
              f"torch {meta['torch']}"
              + (f"; ggml-python {meta['ggml']}." if meta.get("ggml") else
                 "; ggml-python did not run.")),
         "",
         wrap(f"Command: `{meta['command']}`"
              + (f"; other processes kept {100 * meta['other']:.0f}% of the CPUs "
                 "busy during the run." if meta["other"] is not None else ".")),
         "",
         wrap("One decoding step per row: Sq new queries per sequence (causal among "
              "themselves when Sq > 1) against a cache of Sk positions, Hq query "
              "heads over Hkv kv heads. The caches are torch `[B,Hkv,Sk,D]` tensors in "
              "`qkv_alloc` memory (transparent huge pages, as the triad's arrays); "
              "qkv reads them in place as strided views. kvcache: "
              "`qkv_attention_kvcache`; kvcache pm: the same on a copy in qkv's own "
              "`[B,Sk,Hkv,D]` (position-major) layout; paged: `qkv_attention_paged` on a copy in "
              f"blocks of {BLOCK} positions in shuffled order (written by "
              "`qkv_paged_append`), in the row's dtype or int8 with a scale per "
              "row; paged head-major: the same with each head's rows of a block "
              "together (`head_major = 1`); forward: `qkv_attention_forward` on the same tensors (the "
              "prefill kernel); torch SDPA: `scaled_dot_product_attention` with a "
              "`[B,Hq,Sq,D]` query (`enable_gqa`, an explicit bottom-right mask "
              "when Sq > 1); ggml FA: `ggml_flash_attn_ext` on its CPU backend "
              "through ggml-python, reading the same cache memory (an fp32 query, "
              "K/V in the row's dtype; it has no int8 or paged variant here). "
              "Each output is checked against a float64 reference "
              "first (bounds as above; int8 3e-2). qkv's six calls are timed in 9 "
              "rounds that run each once (calls under 5 ms: repeated to 5 ms), in "
              "rotating order, so that load from other processes falls on all of "
              "them alike, and quoted as medians; torch and then ggml run "
              "afterwards, timed as above (torch's OpenMP workers spin on after a "
              "call and would slow what runs next). "
              "GB/s is K and V bytes read per second (int8: codes and scales), "
              "\"of triad\" its share of the row's triad. In brackets: time relative to "
              "qkv kvcache (above 1× slower than it)."),
         "",
         "| B,Sq,Sk,Hq,Hkv,D | dtype | kvcache ms | GB/s | triad GB/s | of triad | kvcache pm ms | "
         "kvcache pm GB/s | paged ms | paged GB/s | paged head-major ms | paged int8 ms | "
         "forward ms | torch SDPA ms | ggml FA ms |",
         "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
         "---: | ---: |"]
    for shape, dtype, res, bw in rows:
        base = res["kvcache"]
        g, gp = gbs(shape, dtype, base), gbs(shape, dtype, res["paged"])
        gm = gbs(shape, dtype, res["kvcache_pm"])
        L.append(f"| {shape.label}{cache_note(shape, dtype, l3)} | {dtype} | "
                 f"{cell(res, 'kvcache', base)} | {f'{g:.1f}' if g else '—'} | {bw:.1f} | "
                 f"{f'{100 * g / bw:.0f}%' if g else '—'} | {cell(res, 'kvcache_pm', base)} | "
                 f"{f'{gm:.1f}' if gm else '—'} | {cell(res, 'paged', base)} | "
                 f"{f'{gp:.1f}' if gp else '—'} | {cell(res, 'paged_hm', base)} | "
                 f"{cell(res, 'paged_i8', base)} | "
                 f"{cell(res, 'forward', base)} | {cell(res, 'sdpa', base)} | "
                 f"{cell(res, 'ggml', base)} |")
    notes = [f"{shape.label} {dtype} {TITLE[k]}: {res[k].note}"
             for shape, dtype, res, _ in rows for k in COLS if res[k].note]
    if notes:
        L += ["", "Notes: " + "; ".join(notes) + "."]
    worst = {}
    for shape, dtype, res, _ in rows:
        for k in COLS:
            e = res[k].err
            if e is not None and e == e:
                worst[k, dtype] = max(worst.get((k, dtype), 0.0), e)
    L += ["", "Largest max-abs error against the float64 reference: "
          + ", ".join(f"{TITLE[k]} {d} {e:.1e}" for (k, d), e in sorted(worst.items())) + "."]
    if pair:
        text = (f"Round by round ({rounds} rounds, each the triad, {PAIRED_WARMUP} untimed "
                f"and then five timed `qkv_attention_kvcache` calls on {PAIRED_SHAPE} "
                f"bf16, medians): " + pair_text(pair))
        if pair_mem:
            text += (f". The same rounds with {evict_mb()} MB of other memory read before each "
                     f"timed call (none of the cache left in the L3 cache, as when a model's "
                     f"other layers run between steps): " + pair_text(pair_mem))
        L += ["", wrap(text + ".")]
    if varlen:
        Hq, Hkv, D = VARLEN_HEADS
        L += ["", wrap(f"Packed variable-length prefill (`qkv_attention_forward` with "
                       f"`cu_seqlens`, causal, bf16, Hq={Hq}, Hkv={Hkv}, D={D}, sequence "
                       f"lengths {', '.join(map(str, VARLEN))}): packed "
                       f"{fmt_ms(varlen['packed'])} ms, the same sequences one call each "
                       f"{fmt_ms(varlen['separate'])} ms in total, one padded batch "
                       f"[{len(VARLEN)}, {max(VARLEN)}] {fmt_ms(varlen['padded'])} ms.")]
    L += [end]
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", default=os.path.join(bench.ROOT, "build", "libqkv.so"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--shapes", nargs="+", type=bench.parse_shape, metavar="B,Sq,Sk,Hq,Hkv,D")
    ap.add_argument("--dtypes", default="bf16,f32", help="comma list of bf16,f32,f16")
    ap.add_argument("--reps", type=int, default=0)
    ap.add_argument("--no-varlen", action="store_true", help="skip the packed prefill line")
    ap.add_argument("--paired", type=int, default=24, metavar="N",
                    help=f"rounds of triad and decode in turn ({PAIRED_SHAPE} bf16), then as many "
                         f"with {evict_mb()} MB of other memory (twice the L3 cache, at least "
                         f"{EVICT_MB}) read before each timed call; "
                         "0: none")
    ap.add_argument("--write-doc", action="store_true")
    a = ap.parse_args()
    dtypes = [d for d in a.dtypes.split(",") if d]
    for d in dtypes:
        if d not in TORCH_DTYPE:
            ap.error(f"unknown dtype '{d}'")
    if not os.path.exists(a.lib):
        sys.exit(f"decode.py: {a.lib} not found (build it: make)")
    threads = max(1, a.threads)
    torch.set_num_threads(threads)
    qkv = Qkv(a.lib, threads)
    bind(qkv)
    shapes = a.shapes or DEFAULT
    # f32 doubles the bytes: the default list runs it on the first B=1 row
    # above the L3 only
    cases = [(s, d) for s in shapes for d in dtypes
             if d == "bf16" or a.shapes or (s.B == 1 and s.Sq == 1 and s.Sk == 32768)]
    l3 = l3_bytes()
    m = bench.machine()
    meta = dict(m, threads=threads, qkv=qkv.version, isa=qkv.isa, torch=torch.__version__,
                python=platform.python_version(), date=datetime.date.today().isoformat(),
                command="python bench/decode.py " + shlex.join(sys.argv[1:]))
    ggml = bench.Ggml(threads)
    if ggml.error:
        print(f"ggml: not run ({ggml.error})")
    meta["ggml"] = ggml.version
    other = bench.OtherLoad().start()
    # the host's memory bandwidth moves between levels from minute to
    # minute: each row is quoted against a triad measured beside it
    bw = qkv.lib.qkv_peak_bandwidth(qkv.ctx)
    print(f"qkv {qkv.version}: kernel set {qkv.isa}, {qkv.threads} threads; "
          f"triad {bw:.1f} GB/s")
    print(f"{'B,Sq,Sk,Hq,Hkv,D':<22} {'dtype':<5} | " + " | ".join(f"{TITLE[k]:>15}" for k in COLS)
          + " | kvcache GB/s | triad")
    rows = []
    for shape, dtype in cases:
        before = bw
        res = rows_for(qkv, ggml, shape, dtype, a.reps)
        bw = qkv.lib.qkv_peak_bandwidth(qkv.ctx)
        rows.append((shape, dtype, res, max(before, bw)))
        g = gbs(shape, dtype, res["kvcache"])
        print(f"{shape.label:<22} {dtype:<5} | "
              + " | ".join(f"{cell(res, k, res['kvcache']):>15}" for k in COLS)
              + (f" | {g:.1f}" if g else " | —") + f" | {max(before, bw):.1f}", flush=True)
        for k in COLS:
            if res[k].note:
                print(f"  {TITLE[k]}: {res[k].note}")
    varlen = None
    if not a.no_varlen:
        varlen = varlen_row(qkv, "bf16", a.reps)
        print(f"packed varlen prefill {fmt_ms(varlen['packed'])} ms, separate calls "
              f"{fmt_ms(varlen['separate'])} ms, padded batch {fmt_ms(varlen['padded'])} ms")
    pair = pair_mem = None
    if a.paired > 0:
        pshape = bench.parse_shape(PAIRED_SHAPE)
        pair = paired_summary(paired(qkv, pshape, "bf16", a.paired))
        pair_mem = paired_summary(paired(qkv, pshape, "bf16", a.paired, evict_array(qkv)))
        for label, pr in (("paired rounds", pair), ("from memory", pair_mem)):
            for name, (t, d, r) in pr.items():
                print(f"{label}, {name}: triad {t:.1f} GB/s, decode {d:.1f} GB/s, "
                      f"decode/triad {100 * r:.0f}%")
    meta["other"] = other.share()
    # decoding only reads: the read-only and copy loops as well, once
    meta["read"] = qkv.lib.qkv_memory_bandwidth(qkv.ctx, STREAM_READ)
    meta["copy"] = qkv.lib.qkv_memory_bandwidth(qkv.ctx, STREAM_COPY)
    print(f"read-only loop {meta['read']:.1f} GB/s, copy {meta['copy']:.1f} GB/s")
    for shape, dtype, res, row_bw in rows:
        g = gbs(shape, dtype, res["kvcache"])
        if g:
            print(f"{shape.label} {dtype}: {g:.1f} GB/s = {100 * g / row_bw:.0f}% of the "
                  f"triad beside it ({row_bw:.1f} GB/s), {100 * g / meta['read']:.0f}% of "
                  "the read-only loop" + cache_note(shape, dtype, l3))
    if a.write_doc:
        write_section(DOC, markdown(meta, rows, l3, varlen, pair, a.paired, pair_mem),
                      *markers(meta["isa"]), after=END)
        print(f"wrote {os.path.relpath(DOC)}")
    qkv.lib.qkv_ctx_free(qkv.ctx)


if __name__ == "__main__":
    main()
