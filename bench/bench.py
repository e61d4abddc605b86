#!/usr/bin/env python3
"""Side-by-side attention benchmark: qkv against its peers, one process.

qkv (libqkv.so through ctypes), torch's scaled_dot_product_attention, the
plain matmul-softmax-matmul path in torch and ggml's flash attention
(ggml-python, CPU backend) run on the same input memory with the same
number of threads. Every output is first checked against a float64
reference on a sample of query rows; then each implementation is timed
(median of repeated runs).

    python bench/bench.py --lib build/libqkv.so [--quick | --full]
        [--shapes B,Sq,Sk,Hq,Hkv,D[:causal] ...] [--dtypes f32,bf16,f16]
        [--peers sdpa,plain,ggml] [--reps N] [--threads N] [--write-doc]

`make bench` sets up bench/.venv (bench/setup.sh) and runs the default
list with --write-doc, which regenerates the marked section of
docs/PERFORMANCE.md.

After the forward rows comes a backward block: qkv_attention_backward
beside PyTorch autograd through SDPA and through the plain path, gradients
checked against float64 autograd first. --backward runs only that block,
--no-backward skips it.
"""
import os

# The float64 reference multiplies small matrices; keep BLAS worker threads
# from spinning next to the timed code. Must precede the numpy import.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import ctypes
import datetime
import importlib.metadata
import math
import platform
import shlex
import statistics
import subprocess
import sys
import textwrap
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "PERFORMANCE.md")
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

TORCH_DTYPE = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
QKV_DTYPE = {"f32": 0, "f16": 1, "bf16": 2}          # qkv_dtype in qkv.h
PEERS = ("sdpa", "plain", "ggml")
PEER_TITLE = {"sdpa": "torch SDPA", "plain": "torch plain", "ggml": "ggml FA"}
PLAIN_LIMIT = 4e9          # bytes of fp32 scores beyond which plain is skipped
MIN_TIME, MIN_REPS, MAX_REPS = 0.3, 3, 15


# ---- shapes ----------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    B: int
    Sq: int
    Sk: int
    Hq: int
    Hkv: int
    D: int
    causal: bool

    @property
    def label(self):
        return f"{self.B},{self.Sq},{self.Sk},{self.Hq},{self.Hkv},{self.D}"

    @property
    def mask(self):
        return "causal" if self.causal else "none"

    @property
    def decode(self):
        return self.Sq <= 16 and self.Sk >= 64 * self.Sq

    def pairs(self):
        """Visible (query, key) pairs per batch entry and head; causal is
        bottom-right aligned: query i sees keys j <= i + Sk - Sq."""
        if not self.causal:
            return self.Sq * self.Sk
        i = np.arange(self.Sq, dtype=np.int64)
        return int(np.clip(i + self.Sk - self.Sq + 1, 0, self.Sk).sum())

    def flops(self):
        return 4 * self.B * self.Hq * self.D * self.pairs()

    def kv_bytes(self, dtype):
        return 2 * self.B * self.Hkv * self.Sk * self.D * TORCH_DTYPE[dtype].itemsize


def parse_shape(text):
    body, _, flag = text.partition(":")
    try:
        B, Sq, Sk, Hq, Hkv, D = (int(x) for x in body.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape '{text}': want B,Sq,Sk,Hq,Hkv,D[:causal]")
    if flag not in ("", "causal", "c"):
        raise argparse.ArgumentTypeError(f"shape '{text}': suffix must be ':causal'")
    if min(B, Sq, Sk, Hq, Hkv, D) < 1 or Hq % Hkv:
        raise argparse.ArgumentTypeError(f"shape '{text}': sizes >= 1, Hq a multiple of Hkv")
    return Shape(B, Sq, Sk, Hq, Hkv, D, bool(flag))


def S(text):
    return parse_shape(text)


BOTH = ("f32", "bf16")
DEFAULT = [
    # tiny
    (S("4,1,1,8,8,64"), BOTH),
    (S("4,16,16,8,8,64"), BOTH),
    (S("4,16,16,8,8,64:causal"), BOTH),
    (S("4,64,64,8,8,64"), BOTH),
    (S("4,64,64,8,8,128:causal"), BOTH),
    # S = 512
    (S("1,512,512,12,12,64"), BOTH),
    (S("4,512,512,12,12,64:causal"), BOTH),
    (S("1,512,512,16,16,128"), BOTH),
    # S = 2048
    (S("1,2048,2048,12,12,64:causal"), BOTH),
    (S("1,2048,2048,12,12,128"), BOTH),
    (S("1,2048,2048,16,4,128:causal"), ("f32", "bf16", "f16")),
    (S("1,2048,2048,32,8,128"), BOTH),
    # S = 8192
    (S("1,8192,8192,8,8,64:causal"), BOTH),
    (S("1,8192,8192,8,8,64"), BOTH),
    (S("1,8192,8192,8,2,128:causal"), BOTH),
    # decode: one query against a long cache
    (S("1,1,4096,32,8,128"), BOTH),
    (S("4,1,4096,32,8,128"), BOTH),
    (S("1,1,32768,32,8,128"), BOTH),
    (S("4,1,32768,32,8,128"), BOTH),
]
QUICK = [
    (S("4,16,16,8,8,64"), BOTH),
    (S("4,64,64,8,8,128:causal"), BOTH),
    (S("1,512,512,12,12,64"), BOTH),
    (S("1,2048,2048,16,4,128:causal"), BOTH),
    (S("1,8192,8192,8,8,64:causal"), BOTH),
    (S("4,1,4096,32,8,128"), BOTH),
]
# The backward block (default and --full; --quick takes BWD_QUICK).
BWD_DEFAULT = [
    (S("1,512,512,12,12,64"), BOTH),
    (S("1,512,512,12,12,64:causal"), BOTH),
    (S("1,512,512,12,12,128"), BOTH),
    (S("1,512,512,12,12,128:causal"), BOTH),
    (S("4,512,512,8,8,64"), BOTH),
    (S("1,2048,2048,12,12,64"), BOTH),
    (S("1,2048,2048,12,12,64:causal"), BOTH),
    (S("1,2048,2048,12,12,128"), BOTH),
    (S("1,2048,2048,12,12,128:causal"), BOTH),
    (S("1,2048,2048,16,4,128:causal"), BOTH),
]
BWD_QUICK = [
    (S("1,512,512,12,12,64:causal"), BOTH),
    (S("1,2048,2048,16,4,128:causal"), BOTH),
]
BWD_PEERS = ("sdpa", "plain")     # ggml has no attention backward to compare
BWD_FACTOR = 2.5                  # backward FLOPs per forward FLOP (FlashAttention)
PLAIN_BWD_LIMIT = 1e9             # fp32 score bytes beyond which plain's autograd is skipped


def full_list():
    out = [(Shape(B, S_, S_, H, H, D, c), BOTH)
           for B in (1, 4) for H in (8, 12, 16) for S_ in (64, 512, 2048, 8192)
           for D in (64, 128) for c in (False, True)]
    seen = {s for s, _ in out}
    return out + [(s, d) for s, d in DEFAULT if s not in seen]


# ---- qkv through ctypes (mirrors include/qkv.h) ------------------------------

class QkvTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("dtype", ctypes.c_int),
                ("shape", ctypes.c_int64 * 4), ("stride", ctypes.c_int64 * 4)]


class QkvOpts(ctypes.Structure):
    _fields_ = [("scale", ctypes.c_float), ("causal", ctypes.c_int),
                ("window_left", ctypes.c_int64), ("window_right", ctypes.c_int64),
                ("softcap", ctypes.c_float),
                ("alibi_slopes", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("cu_seqlens_q", ctypes.c_void_p), ("cu_seqlens_k", ctypes.c_void_p),
                ("n_seqs", ctypes.c_int32),
                ("dropout_p", ctypes.c_float), ("dropout_seed", ctypes.c_uint64)]


class Qkv:
    def __init__(self, path, threads):
        lib = self.lib = ctypes.CDLL(path)
        P = ctypes.POINTER
        sig = {
            "qkv_version": ([], ctypes.c_char_p),
            "qkv_status_string": ([ctypes.c_int], ctypes.c_char_p),
            "qkv_ctx_create": ([ctypes.c_int], ctypes.c_void_p),
            "qkv_ctx_free": ([ctypes.c_void_p], None),
            "qkv_ctx_last_error": ([ctypes.c_void_p], ctypes.c_char_p),
            "qkv_ctx_threads": ([ctypes.c_void_p], ctypes.c_int),
            "qkv_ctx_isa": ([ctypes.c_void_p], ctypes.c_char_p),
            "qkv_peak_gflops": ([ctypes.c_void_p], ctypes.c_double),
            "qkv_attn_opts_default": ([], QkvOpts),
        }
        attn = [ctypes.c_void_p, P(QkvTensor), P(QkvTensor), P(QkvTensor),
                P(QkvOpts), P(QkvTensor), P(ctypes.c_float)]
        sig["qkv_attention_forward"] = (attn, ctypes.c_int)
        sig["qkv_attention_reference"] = (attn, ctypes.c_int)
        T = P(QkvTensor)
        bwd = [ctypes.c_void_p, T, T, T, T, T, P(ctypes.c_float), P(QkvOpts), T, T, T]
        sig["qkv_attention_backward"] = (bwd, ctypes.c_int)
        sig["qkv_attention_backward_reference"] = (bwd, ctypes.c_int)
        for name, (args, res) in sig.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
        self.ctx = lib.qkv_ctx_create(threads)
        if not self.ctx:
            raise RuntimeError(f"qkv_ctx_create({threads}) failed")
        self.version = lib.qkv_version().decode()
        self.isa = lib.qkv_ctx_isa(self.ctx).decode()
        self.threads = lib.qkv_ctx_threads(self.ctx)
        d = lib.qkv_attn_opts_default()
        if (d.window_left, d.window_right, d.scale, d.n_seqs) != (-1, -1, 0.0, 0):
            raise RuntimeError("qkv_attn_opts layout does not match include/qkv.h")

    @staticmethod
    def view(t, dtype):
        """A torch [B,H,S,D] tensor as qkv's [B,S,H,D], by strides, no copy."""
        v = QkvTensor()
        v.data, v.dtype = t.data_ptr(), QKV_DTYPE[dtype]
        b, h, s, d = t.shape
        sb, sh, ss, sd = t.stride()
        v.shape[:] = [b, s, h, d]
        v.stride[:] = [sb, ss, sh, sd]
        return v

    def call(self, fn, q, k, v, out, dtype, causal, lse=None):
        """A closure that runs the forward (or its reference); lse, when
        given, is a contiguous fp32 [B,Hq,Sq] tensor."""
        views = [self.view(t, dtype) for t in (q, k, v, out)]
        opts = self.lib.qkv_attn_opts_default()
        opts.causal = int(causal)
        args = (self.ctx, ctypes.byref(views[0]), ctypes.byref(views[1]),
                ctypes.byref(views[2]), ctypes.byref(opts), ctypes.byref(views[3]),
                self.floats(lse))
        return self.runner(fn, args, (q, k, v, out, lse))

    def call_backward(self, fn, q, k, v, out, dout, lse, dq, dk, dv, dtype, causal):
        """A closure that runs qkv_attention_backward (or its reference)."""
        views = [self.view(t, dtype) for t in (q, k, v, out, dout, dq, dk, dv)]
        opts = self.lib.qkv_attn_opts_default()
        opts.causal = int(causal)
        r = [ctypes.byref(x) for x in views]
        args = (self.ctx, *r[:5], self.floats(lse), ctypes.byref(opts), *r[5:])
        return self.runner(fn, args, (q, k, v, out, dout, lse, dq, dk, dv))

    @staticmethod
    def floats(t):
        if t is None:
            return None
        assert t.dtype == torch.float32 and t.is_contiguous()
        return ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_float))

    def runner(self, fn, args, tensors):
        """byref objects keep their structs alive, but the structs hold bare
        data pointers: the closure keeps the tensors too."""
        def run():
            assert tensors
            st = fn(*args)
            if st:
                raise RuntimeError(f"{self.lib.qkv_status_string(st).decode()}: "
                                   f"{self.lib.qkv_ctx_last_error(self.ctx).decode()}")
        return run

    def peak(self):
        return self.lib.qkv_peak_gflops(self.ctx)


# ---- reference -------------------------------------------------------------

def sample(shape):
    """(b, h) pairs and query rows the float64 reference computes."""
    bh = sorted({(0, 0), (shape.B // 2, shape.Hq // 2), (shape.B - 1, shape.Hq - 1)})
    rows = sorted(set(range(min(4, shape.Sq))) | set(range(max(0, shape.Sq - 4), shape.Sq)))
    return bh, rows


def reference(shape, q, k, v):
    """float64 outputs of the sampled rows, from the (dtype-rounded) inputs."""
    bh, rows = sample(shape)
    group = shape.Hq // shape.Hkv
    r = np.array(rows)
    out = {}
    for b, h in bh:
        Q = q[b, h, rows].double().numpy()
        K = k[b, h // group].double().numpy()
        V = v[b, h // group].double().numpy()
        s = Q @ K.T / math.sqrt(shape.D)
        if shape.causal:
            hidden = np.arange(shape.Sk)[None, :] > (r + shape.Sk - shape.Sq)[:, None]
            s[hidden] = -np.inf
        m = s.max(axis=1, keepdims=True)
        seen = np.isfinite(m)
        p = np.where(seen, np.exp(s - np.where(seen, m, 0)), 0)
        den = p.sum(axis=1, keepdims=True)
        out[b, h] = np.where(den > 0, p @ V / np.where(den > 0, den, 1), 0)
    return out


def max_error(shape, got, ref):
    """got: [B,Hq,Sq,D] in any layout or dtype."""
    _, rows = sample(shape)
    errs = [np.abs(got[b, h, rows].double().numpy() - r).max() for (b, h), r in ref.items()]
    return float(np.max(errs))          # NaN, if any, propagates


def sample_groups(shape):
    """(b, kv head) pairs whose gradients the float64 reference computes:
    every query head of the group, so dk and dv are complete sums."""
    return sorted({(0, 0), (shape.B - 1, shape.Hkv - 1)})


def reference_backward(shape, q, k, v, dout):
    """float64 autograd through matmul-softmax-matmul for the sampled groups,
    from the (dtype-rounded) inputs: {(b, kv head): (dq [g,Sq,D], dk, dv)}.
    A query row that sees no key contributes nothing (as in qkv): it is
    unmasked and its dout zeroed, which gives exactly that."""
    g = shape.Hq // shape.Hkv
    hidden = bottom_right_hidden(shape) if shape.causal else None
    keep = None
    if hidden is not None:
        empty = hidden.all(dim=1)
        hidden = hidden.clone()
        hidden[empty] = False
        keep = (~empty).double()[:, None]
    out = {}
    for b, kh in sample_groups(shape):
        heads = slice(kh * g, (kh + 1) * g)
        Q = q[b, heads].double().requires_grad_()
        K = k[b, kh].double().requires_grad_()
        V = v[b, kh].double().requires_grad_()
        dO = dout[b, heads].double()
        s = Q @ K.T / math.sqrt(shape.D)
        if hidden is not None:
            s = s.masked_fill(hidden, float("-inf"))
            dO = dO * keep
        (torch.softmax(s, dim=-1) @ V).backward(dO)
        out[b, kh] = (Q.grad.numpy(), K.grad.numpy(), V.grad.numpy())
    return out


def grad_error(shape, got, ref):
    """got: (dq, dk, dv) as [B,H,S,D] tensors in any layout or dtype. The
    largest of the three max-abs errors, each relative to the largest
    magnitude of that gradient in the reference."""
    g = shape.Hq // shape.Hkv
    errs = []
    for t in range(3):
        err = scale = 0.0
        for (b, kh), r in ref.items():
            x = got[t][b, kh * g:(kh + 1) * g] if t == 0 else got[t][b, kh]
            err = max(err, float(np.abs(x.double().numpy() - r[t]).max()))
            scale = max(scale, float(np.abs(r[t]).max()))
        errs.append(err / scale if scale > 0 else err)
    return float(np.max(errs))          # NaN, if any, propagates


# ---- peers -----------------------------------------------------------------

class Unavailable(Exception):
    """An implementation that cannot run this case; the text says why."""


def bottom_right_hidden(shape):
    """bool [Sq, Sk], True where a key is hidden from a query."""
    i = torch.arange(shape.Sq)[:, None]
    j = torch.arange(shape.Sk)[None, :]
    return j > i + shape.Sk - shape.Sq


def sdpa_has_gqa():
    try:
        x = torch.zeros(1, 2, 1, 8)
        F.scaled_dot_product_attention(x, x[:, :1], x[:, :1], enable_gqa=True)
        return True
    except TypeError:
        return False


SDPA_GQA = sdpa_has_gqa()


def prep_sdpa(shape, dtype, q, k, v):
    kw = {}
    if shape.Hq != shape.Hkv:
        if SDPA_GQA:
            kw["enable_gqa"] = True
        else:          # older torch: expand K/V up front, outside the timing
            g = shape.Hq // shape.Hkv
            k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    if shape.causal and shape.Sq > 1:
        if shape.Sq == shape.Sk:
            kw["is_causal"] = True          # top-left == bottom-right here
        else:                               # is_causal is top-left aligned
            kw["attn_mask"] = ~bottom_right_hidden(shape)
    res = [None]

    def run():
        res[0] = F.scaled_dot_product_attention(q, k, v, **kw)
    return run, lambda: res[0]


def leaves(*ts):
    """Autograd leaves sharing the tensors' memory (no copy)."""
    return [t.detach().requires_grad_() for t in ts]


def timed_backward(out, dout, xs):
    """out.backward(dout) on a kept graph, the inputs' grads dropped first so
    that every run writes fresh ones instead of accumulating."""
    def run():
        for x in xs:
            x.grad = None
        out.backward(dout, retain_graph=True)
    run.grad_fn = out.grad_fn.name()        # which kernel autograd will run
    return run, lambda: tuple(x.grad for x in xs)


def prep_sdpa_backward(shape, dtype, q, k, v, dout):
    q, k, v = leaves(q, k, v)
    kw = {}
    kk, vv = k, v
    if shape.Hq != shape.Hkv:
        if SDPA_GQA:
            kw["enable_gqa"] = True
        else:          # older torch: expand K/V inside the graph
            g = shape.Hq // shape.Hkv
            kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    if shape.causal and shape.Sq > 1:
        if shape.Sq == shape.Sk:
            kw["is_causal"] = True
        else:
            kw["attn_mask"] = ~bottom_right_hidden(shape)
    out = F.scaled_dot_product_attention(q, kk, vv, **kw)      # not timed
    return timed_backward(out, dout, (q, k, v))


def prep_plain_backward(shape, dtype, q, k, v, dout):
    need = shape.B * shape.Hq * shape.Sq * shape.Sk * 4
    if need > PLAIN_BWD_LIMIT:
        raise Unavailable(f"skipped: scores would need {need / 1e9:.1f} GB")
    q, k, v = leaves(q, k, v)
    g = shape.Hq // shape.Hkv
    scores = q.view(shape.B, shape.Hkv, g * shape.Sq, shape.D) @ k.transpose(-2, -1)
    scores = scores * (1 / math.sqrt(shape.D))
    if shape.causal:
        scores = scores.masked_fill(bottom_right_hidden(shape).repeat(g, 1), float("-inf"))
    out = (torch.softmax(scores, dim=-1) @ v).view(shape.B, shape.Hq, shape.Sq, shape.D)
    return timed_backward(out, dout, (q, k, v))


def prep_plain(shape, dtype, q, k, v):
    need = shape.B * shape.Hq * shape.Sq * shape.Sk * 4
    if need > PLAIN_LIMIT:
        raise Unavailable(f"skipped: scores would need {need / 1e9:.1f} GB")
    g = shape.Hq // shape.Hkv
    # The g query heads that share a kv head form one [g*Sq, D] matrix: GQA
    # without copying K/V.
    qg = q.view(shape.B, shape.Hkv, g * shape.Sq, shape.D)
    kt = k.transpose(-2, -1)
    scale = 1 / math.sqrt(shape.D)
    hidden = bottom_right_hidden(shape).repeat(g, 1) if shape.causal else None
    res = [None]

    def run():
        scores = qg @ kt * scale
        if hidden is not None:
            scores = scores.masked_fill(hidden, float("-inf"))
        p = torch.softmax(scores, dim=-1)
        res[0] = p @ v
    return run, lambda: res[0].view(shape.B, shape.Hq, shape.Sq, shape.D)


class Ggml:
    """ggml_flash_attn_ext on ggml's CPU backend, through ggml-python."""

    def __init__(self, threads):
        self.threads = threads
        self.error = None
        self.ctx = self.pool = self.keep = None
        try:
            import ggml
            self.g = ggml
            self.version = importlib.metadata.version("ggml-python")
            lib = getattr(ggml, "lib", None)
            if lib is not None and hasattr(lib, "ggml_version"):
                lib.ggml_version.restype = ctypes.c_char_p
                self.version += f" (ggml {lib.ggml_version().decode()})"
            self.types = {"f32": ggml.GGML_TYPE_F32, "f16": ggml.GGML_TYPE_F16,
                          "bf16": ggml.GGML_TYPE_BF16}
            self.pad = int(getattr(ggml, "GGML_KQ_MASK_PAD", 1))
            self.self_check()
        except Exception as e:  # noqa: BLE001 - any failure means: no ggml column
            self.error = f"{type(e).__name__}: {e}"
            self.version = None

    def self_check(self):
        shape = Shape(1, 5, 7, 2, 1, 64, True)
        gen = torch.Generator().manual_seed(7)
        q, k, v = (torch.randn(1, h, s, 64, generator=gen)
                   for h, s in ((2, 5), (1, 7), (1, 7)))
        run, result = self.prepare(shape, "f32", q, k, v)
        try:
            run()
            err = max_error(shape, result(), reference(shape, q, k, v))
        finally:
            self.release()
        if not err < 1e-4:
            raise RuntimeError(f"ggml_flash_attn_ext disagrees with the reference ({err:.2g})")

    def prepare(self, shape, dtype, q, k, v):
        g = self.g
        # Q must be F32 for the CPU kernel; K/V are passed in the row's dtype
        # (F32, F16 and BF16 all run). A bf16/f16 Q is widened (exactly)
        # outside the timing; the output is F32.
        if q.dtype != torch.float32:
            q = q.float()
        out = torch.empty(shape.B, shape.Sq, shape.Hq, shape.D)   # ggml's permuted result
        params = g.ggml_init_params(mem_size=16 << 20, mem_buffer=None, no_alloc=True)
        ctx = g.ggml_init(params)
        if not ctx:
            raise Unavailable("ggml_init failed")
        self.ctx, self.keep = ctx, [q, k, v, out]

        def tensor(t, gtype):
            x = g.ggml_new_tensor_4d(ctx, gtype, t.shape[3], t.shape[2], t.shape[1], t.shape[0])
            x.contents.data = t.data_ptr()
            return x
        gq = tensor(q, g.GGML_TYPE_F32)
        gk, gv = tensor(k, self.types[dtype]), tensor(v, self.types[dtype])
        mask = None
        if shape.causal and shape.Sq > 1:
            rows = -(-shape.Sq // self.pad) * self.pad
            m = torch.zeros(rows, shape.Sk, dtype=torch.float16)
            m[:shape.Sq].masked_fill_(bottom_right_hidden(shape), float("-inf"))
            mask = g.ggml_new_tensor_4d(ctx, g.GGML_TYPE_F16, shape.Sk, rows, 1, 1)
            mask.contents.data = m.data_ptr()
            self.keep.append(m)
        res = g.ggml_flash_attn_ext(ctx, gq, gk, gv, mask, 1 / math.sqrt(shape.D), 0.0, 0.0)
        if not res:
            raise Unavailable("ggml_flash_attn_ext refused the operands")
        g.ggml_flash_attn_ext_set_prec(res, g.GGML_PREC_F32)
        res.contents.data = out.data_ptr()
        graph = g.ggml_new_graph(ctx)
        g.ggml_build_forward_expand(graph, res)
        tpp = g.ggml_threadpool_params_default(self.threads)
        self.pool = g.ggml_threadpool_new(ctypes.byref(tpp))
        if not self.pool:
            raise Unavailable("ggml_threadpool_new failed")
        plan = g.ggml_graph_plan(graph, self.threads, self.pool)
        work = (ctypes.c_uint8 * max(1, plan.work_size))()
        plan.work_data = ctypes.cast(work, ctypes.POINTER(ctypes.c_uint8))
        self.keep += [work, plan, graph]
        plan_ref = ctypes.byref(plan)

        def run():
            st = g.ggml_graph_compute(graph, plan_ref)
            if st != 0:
                raise RuntimeError(f"ggml_graph_compute returned {st}")
        return run, lambda: out.transpose(1, 2)

    def release(self):
        """Frees the case's context and thread pool (its workers would
        otherwise keep polling next to the other implementations)."""
        if self.pool:
            self.g.ggml_threadpool_free(self.pool)
        if self.ctx:
            self.g.ggml_free(self.ctx)
        self.ctx = self.pool = self.keep = None


# ---- timing ----------------------------------------------------------------

SETTLE_S = 0.05   # pause before each timing (see measure)


def time_ms(run, reps):
    """Median of timed runs: `reps` of them, or at least MIN_REPS and
    MIN_TIME seconds, at most MAX_REPS. The caller has warmed up."""
    times = []
    while True:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
        n = len(times)
        if reps:
            if n >= reps:
                break
        elif n >= MAX_REPS or (n >= MIN_REPS and sum(times) >= MIN_TIME):
            break
    return statistics.median(times) * 1e3


def bound(dtype, v):
    return 1e-4 * float(v.abs().max()) if dtype == "f32" else 3e-2


# Gradient bounds, relative to the largest |gradient| of the reference.
BWD_BOUND = {"f32": 1e-4, "bf16": 3e-2, "f16": 3e-2}


@dataclass
class Result:
    ms: float = None
    err: float = None
    bad: bool = False
    note: str = ""


def measure(prepare, error, limit, reps):
    """prepare() -> (run, result); error(result()) -> the checked error."""
    r = Result()
    try:
        run, result = prepare()
        run()                                     # warm-up, and the checked output
        r.err = error(result())
        r.bad = not r.err <= limit
        if r.bad:
            r.note = f"error {r.err:.2g} over the bound {limit:.2g}"
        # torch's OpenMP workers spin for milliseconds after a call and
        # would take cores from whatever is timed next: let them go idle,
        # then wake this implementation's own threads with an untimed call
        time.sleep(SETTLE_S)
        run()
        r.ms = time_ms(run, reps)
    except Unavailable as e:
        r.note = str(e)
    except Exception as e:  # noqa: BLE001 - a failing implementation gets n/a, the run goes on
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        r.note = f"{type(e).__name__}: {first}"
    return r


def case_bytes(shape):
    """Memory a case's tensors take at most: fp32 inputs while they are
    drawn, the outputs of two implementations and ggml's fp32 Q."""
    q = shape.B * shape.Hq * shape.Sq * shape.D * 4
    kv = shape.B * shape.Hkv * shape.Sk * shape.D * 4
    return 4 * q + 2 * kv + kv // 2


def available_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_ticks():
    """(all CPU time, busy CPU time) in seconds since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    return sum(v) / hz, (sum(v) - v[3] - v[4]) / hz      # less idle and iowait


class OtherLoad:
    """Share of all CPUs that processes other than this one kept busy
    between start() and share()."""

    def start(self):
        try:
            self.t0, self.b0 = cpu_ticks()
            self.own0 = sum(os.times()[:2])
        except (OSError, ValueError, IndexError):
            self.t0 = None
        return self

    def share(self):
        if self.t0 is None:
            return None
        try:
            t1, b1 = cpu_ticks()
        except (OSError, ValueError, IndexError):
            return None
        own = sum(os.times()[:2]) - self.own0
        return max(0.0, (b1 - self.b0 - own) / max(1e-9, t1 - self.t0))


def cpu_busy(seconds=1.0):
    """Share of all CPUs other processes kept busy over `seconds`."""
    load = OtherLoad().start()
    time.sleep(seconds)
    return load.share()


# ---- machine ---------------------------------------------------------------

def machine():
    info = {"model": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        kv = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        kv = {a.strip(): b.strip() for a, b in kv.items()}
        info["model"] = kv.get("Model name", info["model"])
        if "Core(s) per socket" in kv and "Socket(s)" in kv:
            info["cores"] = int(kv["Core(s) per socket"]) * int(kv["Socket(s)"])
    except (OSError, subprocess.CalledProcessError, ValueError):
        pass
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    info["flags"] = {f: f in flags for f in ("avx512f", "avx512_bf16", "amx_tile")}
    return info


# ---- output ----------------------------------------------------------------

def speedup(qkv, peer):
    if peer.ms is None:
        return None
    if qkv.ms is None or qkv.bad or peer.bad:
        return None
    return peer.ms / qkv.ms


def fmt_ms(ms):
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def peer_cell(qkv, peer):
    if peer.ms is None:
        return "n/a"
    sp = speedup(qkv, peer)
    tail = f" ({fmt_x(sp)})" if sp is not None else " (err!)" if peer.bad else ""
    return fmt_ms(peer.ms) + tail


def text_header(peers, backward=False):
    head = (f"{'B,Sq,Sk,Hq,Hkv,D':<22} {'dtype':<5} {'mask':<6} | "
            f"{'qkv bwd ms' if backward else 'qkv ms':>10} {'GFLOP/s':>8} {'ceil':>5}"
            + ("" if backward else f" {'KV GB/s':>7}"))
    for p in peers:
        head += f" | {PEER_TITLE[p] + (' bwd' if backward else '') + ' ms (×)':>22}"
    return head


def flops(shape, backward):
    return shape.flops() * (BWD_FACTOR if backward else 1)


def text_row(shape, dtype, res, peers, peak, backward=False):
    q = res["qkv"]
    if q.ms is not None:
        gf = flops(shape, backward) / q.ms / 1e6
        gbs = f"{shape.kv_bytes(dtype) / q.ms / 1e6:7.1f}" if shape.decode else f"{'-':>7}"
        qcell = f"{fmt_ms(q.ms):>10} {gf:8.1f} {100 * gf / peak:4.0f}%" + ("" if backward else f" {gbs}")
        if q.bad:
            qcell += " err!"
    else:
        qcell = f"{'n/a':>10} {'':8} {'':5}" + ("" if backward else f" {'':7}")
    line = f"{shape.label:<22} {dtype:<5} {shape.mask:<6} | {qcell}"
    for p in peers:
        line += f" | {peer_cell(q, res[p]):>22}"
    notes = [f"    {n}: {res[n].note}" for n in ["qkv", *peers] if res[n].note]
    return "\n".join([line, *notes])


def geomean(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def summaries(rows, peers):
    out = []
    for p in peers:
        sps = [speedup(res["qkv"], res[p]) for _, _, res in rows]
        sps = [s for s in sps if s is not None]
        g = geomean(sps)
        out.append((p, g, len(sps)))
    return out


def error_table(rows, names):
    """Worst max-abs error per implementation and dtype."""
    worst = {}
    for _, dtype, res in rows:
        for n in names:
            e = res[n].err
            if e is not None:
                worst[n, dtype] = max(worst.get((n, dtype), 0.0), e)
    return worst


def wrap(text, bullet=False):
    return textwrap.fill(text, 76, subsequent_indent="  " if bullet else "",
                         break_long_words=False, break_on_hyphens=False)


def fmt_x(x):
    return f"{x:.{2 if x < 10 else 1 if x < 100 else 0}f}×"


def error_lines(rows, names, text):
    dtypes = sorted({d for _, d, _ in rows}, key=list(TORCH_DTYPE).index)
    worst = error_table(rows, names)
    L = [wrap(text), "",
         "| implementation | " + " | ".join(dtypes) + " |",
         "| --- | " + " | ".join("---:" for _ in dtypes) + " |"]
    for n in names:
        L.append(f"| {n if n == 'qkv' else PEER_TITLE[n]} | "
                 + " | ".join(f"{worst[n, d]:.1e}" if (n, d) in worst else "—" for d in dtypes)
                 + " |")
    return L


def note_lines(rows, names):
    notes = [(shape, dtype, n, res[n].note) for shape, dtype, res in rows
             for n in names if res[n].note]
    if not notes:
        return []
    return ["", "Not run or flagged:", ""] + [
        wrap(f"- {s.label} {d} {s.mask}, {n if n == 'qkv' else PEER_TITLE[n]}: {t}", True)
        for s, d, n, t in notes]


def mean_lines(rows, peers):
    return ["", wrap("Geometric mean of qkv's speed-up: "
                     + "; ".join(f"over {PEER_TITLE[p]} {fmt_x(g)} ({n} rows)" if g else
                                 f"over {PEER_TITLE[p]} — (no rows)"
                                 for p, g, n in summaries(rows, peers)) + "."), ""]


def markdown(meta, rows, peers, peak, brows, bpeers):
    names = ["qkv", *peers]
    flags = ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in meta["flags"].items())
    sdpa_gqa = ("`enable_gqa=True` for grouped heads" if SDPA_GQA else
                "K/V `repeat_interleave`d before timing for grouped heads")
    ggml = (f"ggml FA: `ggml_flash_attn_ext` on the CPU backend with F32 "
            f"precision and its own thread pool. Its CPU kernel needs an F32 Q "
            f"(bf16/f16 Q values are widened, exactly, before timing); K/V are "
            f"passed in the row's dtype, the output is F32; causal is an F16 "
            f"0/−∞ mask padded to {meta['ggml_pad']} rows."
            if meta["ggml"] else f"ggml FA: not run ({meta['ggml_error']}).")
    L = [BEGIN,
         "<!-- Generated by `make bench` (bench/bench.py --write-doc): "
         "edit the script, not this section. -->",
         "",
         f"## Side by side: qkv, torch and ggml, {meta['threads']} threads ({meta['date']})",
         "",
         wrap(f"Machine: {meta['model']}, {meta['cores']} cores ({flags}). "
              f"qkv {meta['qkv']}, kernel set `{meta['isa']}`; measured fp32 "
              f"FMA ceiling {peak:.0f} GFLOP/s. Python {meta['python']}, torch "
              f"{meta['torch']}, numpy {meta['numpy']}, ggml-python "
              f"{meta['ggml'] or 'not available'}."),
         "",
         wrap(f"Command: `{meta['command']}`"
              + (f"; other processes kept {100 * meta['other']:.0f}% of the CPUs "
                 "busy during the run." if meta["other"] is not None else ".")),
         ""]
    if rows:
        L += [
         wrap("All implementations run in one Python process on the same input "
              "memory (torch's `[B,H,S,D]` tensors, passed to qkv as strided "
              "`[B,S,H,D]` views, no copy) with the same thread count. Each "
              "output is first checked against a float64 reference on sampled "
              "query rows; times are medians of at least 3 runs and 0.3 s (at "
              "most 15). GFLOP/s counts `4·B·Hq·D` per visible (query, key) "
              "pair; \"of ceiling\" is qkv's share of the measured fp32 FMA "
              "ceiling (bf16 rows on kernels with bf16 dot products can pass "
              "100%); KV GB/s (decode rows) is K and V bytes read per second. "
              "Peer columns: time in ms and, in brackets, qkv's speed-up (peer "
              "time / qkv time; above 1× qkv is faster)."),
         "",
         wrap(f"- torch SDPA: `scaled_dot_product_attention`, {sdpa_gqa}, "
              "`is_causal` when Sq = Sk, no mask for a single query, an "
              "explicit bottom-right mask otherwise.", True),
         wrap("- torch plain: `q @ kᵀ * scale`, `masked_fill` (bottom-right "
              "causal), `softmax`, `@ v` in the row's dtype; the query heads "
              "sharing a kv head form one matrix (no K/V copy); skipped when "
              "the fp32 score matrix would exceed 4 GB.", True),
         wrap("- " + ggml, True),
         "",
         "| B,Sq,Sk,Hq,Hkv,D | dtype | mask | qkv ms | GFLOP/s | of ceiling | KV GB/s | "
         + " | ".join(PEER_TITLE[p] for p in peers) + " |",
         "| --- | --- | --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in peers) + " |"]
        for shape, dtype, res in rows:
            q = res["qkv"]
            if q.ms is not None:
                gf = shape.flops() / q.ms / 1e6
                cells = [fmt_ms(q.ms) + (" (err!)" if q.bad else ""), f"{gf:.0f}",
                         f"{100 * gf / peak:.0f}%",
                         f"{shape.kv_bytes(dtype) / q.ms / 1e6:.1f}" if shape.decode else "—"]
            else:
                cells = ["n/a", "—", "—", "—"]
            cells += [peer_cell(q, res[p]) for p in peers]
            L.append(f"| {shape.label} | {dtype} | {shape.mask} | " + " | ".join(cells) + " |")
        L += note_lines(rows, names)
        L += mean_lines(rows, peers)
        L += error_lines(rows, names,
                         "Largest max-abs error against the float64 reference over all "
                         "rows (bounds: f32 1e-4·max|v|, bf16/f16 3e-2; ggml's output "
                         "is F32, the others' is in the row's dtype):")
        L += [""]
    if brows:
        L += backward_markdown(meta, brows, bpeers, peak)
    L += [END]
    return "\n".join(L)


def fmt_e(x):
    return f"{x:.0e}".replace("e-0", "e-")


def backward_markdown(meta, rows, peers, peak):
    names = ["qkv", *peers]
    fns = meta.get("sdpa_bwd_fns") or []
    kernel = (" (autograd node " + ", ".join(f"`{f}`" for f in fns) + ")") if fns else ""
    L = ["### Backward", "",
         wrap("`qkv_attention_backward` beside PyTorch autograd, same process, "
              "inputs and thread count. dout is `torch.randn` in the row's dtype. "
              "qkv: the forward runs once (writing lse), then the backward alone "
              "is timed (dq, dk, dv from q, k, v, out, dout and lse). The peers "
              "build their forward graph once from `requires_grad` views of the "
              "same inputs, untimed; `out.backward(dout, retain_graph=True)` is "
              "timed, the inputs' `.grad` dropped before each run so that every "
              "run writes fresh gradients. Before timing, dq, dk and dv are "
              "compared with float64 autograd through matmul–softmax–matmul on "
              "the rounded inputs, for the first and the last kv head (every "
              "query head of its group, so dk and dv are complete); the error is "
              "the max-abs difference relative to the largest |gradient| of the "
              f"reference, the worst of the three (bounds: f32 {fmt_e(BWD_BOUND['f32'])}, "
              f"bf16/f16 {fmt_e(BWD_BOUND['bf16'])}); a row over it is flagged and "
              "left out of the speed-ups. GFLOP/s counts 2.5× the forward's "
              "FLOPs, FlashAttention's convention: `4·B·Hq·D` per visible pair "
              "× 2.5 (five Sq×Sk matrix products against the forward's two); "
              "\"of ceiling\" as above. Times are medians as above."),
         "",
         wrap(f"- torch SDPA: autograd through `scaled_dot_product_attention`{kernel}, "
              "`is_causal` (Sq = Sk here), `enable_gqa` for grouped heads.", True),
         wrap("- torch plain: autograd through the plain path above (the saved "
              "probabilities make it O(Sq·Sk) in memory); skipped when the fp32 "
              f"score matrix would exceed {PLAIN_BWD_LIMIT / 1e9:.0f} GB.", True),
         "- ggml: not run (no attention backward to compare).",
         "",
         "| B,Sq,Sk,Hq,Hkv,D | dtype | mask | qkv bwd ms | GFLOP/s | of ceiling | "
         + " | ".join(PEER_TITLE[p] + " bwd" for p in peers) + " |",
         "| --- | --- | --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in peers) + " |"]
    for shape, dtype, res in rows:
        q = res["qkv"]
        if q.ms is not None:
            gf = flops(shape, True) / q.ms / 1e6
            cells = [fmt_ms(q.ms) + (" (err!)" if q.bad else ""), f"{gf:.0f}",
                     f"{100 * gf / peak:.0f}%"]
        else:
            cells = ["n/a", "—", "—"]
        cells += [peer_cell(q, res[p]) for p in peers]
        L.append(f"| {shape.label} | {dtype} | {shape.mask} | " + " | ".join(cells) + " |")
    L += note_lines(rows, names)
    L += mean_lines(rows, peers)
    L += error_lines(rows, names,
                     "Largest gradient error against float64 autograd over all rows "
                     "(max-abs over dq, dk, dv, relative to the largest |gradient|; "
                     "gradients are in the row's dtype):")
    return L + [""]


def write_doc(section):
    with open(DOC) as f:
        text = f.read()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:     # first time: after the "How to reproduce" section
        at = text.find("## How to reproduce")
        nxt = text.find("\n## ", at + 1) if at >= 0 else -1
        if nxt < 0:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        else:
            text = text[:nxt + 1] + section + "\n\n" + text[nxt + 1:]
    with open(DOC, "w") as f:
        f.write(text)


# ---- main ------------------------------------------------------------------

def self_check(qkv):
    """qkv's forward, backward and their references through these bindings
    against the float64 references here, on a small causal GQA case."""
    shape = Shape(2, 37, 53, 4, 2, 64, True)
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(2, 4, 37, 64, generator=gen)
    k = torch.randn(2, 2, 53, 64, generator=gen)
    v = torch.randn(2, 2, 53, 64, generator=gen)
    dout = torch.randn(2, 4, 37, 64, generator=gen)
    ref = reference(shape, q, k, v)
    gref = reference_backward(shape, q, k, v, dout)
    for fwd, bwd in (("qkv_attention_forward", "qkv_attention_backward"),
                     ("qkv_attention_reference", "qkv_attention_backward_reference")):
        out, lse = torch.empty_like(q), torch.empty(2, 4, 37)
        qkv.call(getattr(qkv.lib, fwd), q, k, v, out, "f32", True, lse)()
        err = max_error(shape, out, ref)
        if not err < 1e-5:
            sys.exit(f"bench.py: {fwd} through ctypes disagrees with the reference "
                     f"({err:.2g}); do the structs still match include/qkv.h?")
        grads = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        qkv.call_backward(getattr(qkv.lib, bwd), q, k, v, out, dout, lse, *grads,
                          "f32", True)()
        err = grad_error(shape, grads, gref)
        if not err < 1e-5:
            sys.exit(f"bench.py: {bwd} through ctypes disagrees with float64 autograd "
                     f"({err:.2g}); do the signatures still match include/qkv.h?")


def label(shape, dtype):
    return f"{shape.label:<22} {dtype:<5} {shape.mask:<6} |"


def inputs(shape, dtype, backward=False):
    """Q, K, V (and dout) drawn with a seed fixed per shape and dtype, or
    None when they do not fit (the reason printed)."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{shape}{dtype}{'bwd' if backward else ''}".encode()))
    tdt = TORCH_DTYPE[dtype]
    need, have = case_bytes(shape) * (3 if backward else 1), available_bytes()
    if have and need > 0.8 * have:
        print(f"{label(shape, dtype)} skipped: tensors would need {need / 1e9:.1f} GB "
              f"of {have / 1e9:.1f} GB available", flush=True)
        return None
    try:
        t = [torch.randn(shape.B, shape.Hq, shape.Sq, shape.D, generator=gen).to(tdt),
             torch.randn(shape.B, shape.Hkv, shape.Sk, shape.D, generator=gen).to(tdt),
             torch.randn(shape.B, shape.Hkv, shape.Sk, shape.D, generator=gen).to(tdt)]
        if backward:
            t.append(torch.randn(shape.B, shape.Hq, shape.Sq, shape.D, generator=gen).to(tdt))
    except (RuntimeError, MemoryError) as e:
        print(f"{label(shape, dtype)} inputs: {e}", flush=True)
        return None
    return t


def forward_rows(cases, peers, qkv, ggml, reps, peak):
    rows = []
    for shape, dts in cases:
        for dtype in dts:
            t = inputs(shape, dtype)
            if t is None:
                continue
            q, k, v = t
            ref = reference(shape, q, k, v)
            limit = bound(dtype, v)
            error = lambda got: max_error(shape, got, ref)
            res = {}
            out = torch.empty_like(q)
            res["qkv"] = measure(lambda: (
                qkv.call(qkv.lib.qkv_attention_forward, q, k, v, out, dtype, shape.causal),
                lambda: out), error, limit, reps)
            del out
            for p in peers:
                if p == "sdpa":
                    prep = lambda: prep_sdpa(shape, dtype, q, k, v)
                elif p == "plain":
                    prep = lambda: prep_plain(shape, dtype, q, k, v)
                else:
                    prep = lambda: ggml.prepare(shape, dtype, q, k, v)
                try:
                    res[p] = measure(prep, error, limit, reps)
                finally:
                    if p == "ggml":
                        ggml.release()
            rows.append((shape, dtype, res))
            print(text_row(shape, dtype, res, peers, peak), flush=True)
            del q, k, v, t
    return rows


def backward_rows(cases, peers, qkv, reps, peak, sdpa_fns):
    rows = []
    for shape, dts in cases:
        for dtype in dts:
            t = inputs(shape, dtype, backward=True)
            if t is None:
                continue
            q, k, v, dout = t
            gref = reference_backward(shape, q, k, v, dout)
            error = lambda got: grad_error(shape, got, gref)
            limit = BWD_BOUND[dtype]
            res = {}

            def prep_qkv():
                out = torch.empty_like(q)
                lse = torch.empty(shape.B, shape.Hq, shape.Sq)
                qkv.call(qkv.lib.qkv_attention_forward, q, k, v, out, dtype,
                         shape.causal, lse)()                             # not timed
                grads = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
                return (qkv.call_backward(qkv.lib.qkv_attention_backward, q, k, v, out,
                                          dout, lse, *grads, dtype, shape.causal),
                        lambda: grads)
            res["qkv"] = measure(prep_qkv, error, limit, reps)
            for p in peers:
                if p == "sdpa":
                    def prep():
                        run, result = prep_sdpa_backward(shape, dtype, q, k, v, dout)
                        sdpa_fns.add(run.grad_fn)
                        return run, result
                else:
                    prep = lambda: prep_plain_backward(shape, dtype, q, k, v, dout)
                res[p] = measure(prep, error, limit, reps)
            rows.append((shape, dtype, res))
            print(text_row(shape, dtype, res, peers, peak, backward=True), flush=True)
            del q, k, v, dout, t
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", default=os.path.join(ROOT, "build", "libqkv.so"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quick", action="store_true", help="a short subset (about 1.5 minutes on 2 cores)")
    ap.add_argument("--full", action="store_true", help="the whole cross product")
    ap.add_argument("--shapes", nargs="+", type=parse_shape, metavar="B,Sq,Sk,Hq,Hkv,D[:causal]")
    ap.add_argument("--dtypes", help="comma list of f32,bf16,f16 (default: per shape)")
    ap.add_argument("--peers", default=",".join(PEERS), help="comma list of sdpa,plain,ggml")
    ap.add_argument("--reps", type=int, default=0,
                    help="timed runs per case (default: >= 3 and >= 0.3 s, <= 15)")
    bw = ap.add_mutually_exclusive_group()
    bw.add_argument("--backward", action="store_true",
                    help="only the backward block (default: forward rows, then backward)")
    bw.add_argument("--no-backward", action="store_true", help="only the forward rows")
    ap.add_argument("--write-doc", action="store_true",
                    help=f"regenerate the marked section of {os.path.relpath(DOC, ROOT)}")
    a = ap.parse_args()

    peers = [p for p in a.peers.split(",") if p]
    for p in peers:
        if p not in PEERS:
            ap.error(f"unknown peer '{p}' (choose from {','.join(PEERS)})")
    dtypes = a.dtypes.split(",") if a.dtypes else None
    for d in dtypes or []:
        if d not in TORCH_DTYPE:
            ap.error(f"unknown dtype '{d}' (choose from f32,bf16,f16)")
    if a.shapes:
        cases = bcases = [(s, BOTH) for s in a.shapes]
    else:
        cases = QUICK if a.quick else full_list() if a.full else DEFAULT
        bcases = BWD_QUICK if a.quick else BWD_DEFAULT
    cases = [] if a.backward else [(s, tuple(dtypes) if dtypes else d) for s, d in cases]
    bcases = [] if a.no_backward else [(s, tuple(dtypes) if dtypes else d) for s, d in bcases]

    if not os.path.exists(a.lib):
        sys.exit(f"bench.py: {a.lib} not found (build it: make)")
    threads = max(1, a.threads)
    torch.set_num_threads(threads)
    qkv = Qkv(a.lib, threads)
    self_check(qkv)
    ggml = Ggml(threads) if "ggml" in peers and cases else None
    if ggml and ggml.error:
        print(f"ggml: skipped, {ggml.error}")
        peers.remove("ggml")
    bpeers = [p for p in peers if p in BWD_PEERS]
    peak = qkv.peak()

    m = machine()
    meta = dict(m, threads=threads, qkv=qkv.version, isa=qkv.isa,
                python=platform.python_version(), torch=torch.__version__,
                numpy=np.__version__, ggml=ggml.version if ggml else None,
                ggml_error=ggml.error if ggml else "not requested",
                ggml_pad=ggml.pad if ggml and not ggml.error else None,
                date=datetime.date.today().isoformat(),
                command="python bench/bench.py " + shlex.join(sys.argv[1:]))
    print(f"machine: {m['model']}, {m['cores']} cores, "
          + ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in m["flags"].items()))
    print(f"qkv {qkv.version}: kernel set {qkv.isa}, {qkv.threads} threads, "
          f"fp32 FMA ceiling {peak:.0f} GFLOP/s")
    print(f"torch {torch.__version__} ({threads} threads, SDPA GQA: "
          f"{'enable_gqa' if SDPA_GQA else 'repeat_interleave'}), numpy {np.__version__}, "
          f"ggml-python {meta['ggml'] or 'not run'}")
    busy = cpu_busy()
    meta["busy"] = busy
    if busy is not None and busy > 0.2:
        print(f"note: the CPUs were {100 * busy:.0f}% busy just before the run: other "
              "processes compete for the cores and the times will suffer")

    start = time.perf_counter()
    other = OtherLoad().start()
    rows = brows = []
    sdpa_fns = set()
    if cases:
        print(text_header(peers), flush=True)
        rows = forward_rows(cases, peers, qkv, ggml, a.reps, peak)
        for p, g, n in summaries(rows, peers):
            print(f"geometric-mean speed-up of qkv over {PEER_TITLE[p]}: "
                  + (f"{fmt_x(g)} ({n} rows)" if g else "— (no comparable rows)"))
        worst = error_table(rows, ["qkv", *peers])
        print("largest max-abs error vs float64: "
              + ", ".join(f"{n} {d} {e:.1e}" for (n, d), e in sorted(worst.items())))
    if bcases:
        print(f"\nbackward ({BWD_FACTOR}× the forward's FLOPs; gradient errors relative "
              "to the largest |gradient|; ggml not run)")
        print(text_header(bpeers, backward=True), flush=True)
        brows = backward_rows(bcases, bpeers, qkv, a.reps, peak, sdpa_fns)
        for p, g, n in summaries(brows, bpeers):
            print(f"geometric-mean backward speed-up of qkv over {PEER_TITLE[p]}: "
                  + (f"{fmt_x(g)} ({n} rows)" if g else "— (no comparable rows)"))
        worst = error_table(brows, ["qkv", *bpeers])
        print("largest relative gradient error vs float64: "
              + ", ".join(f"{n} {d} {e:.1e}" for (n, d), e in sorted(worst.items())))
        print("SDPA backward node: " + (", ".join(sorted(sdpa_fns)) or "—"))
    meta["sdpa_bwd_fns"] = sorted(sdpa_fns)
    meta["other"] = other.share()
    print(f"total {time.perf_counter() - start:.0f} s"
          + (f"; other processes kept {100 * meta['other']:.0f}% of the CPUs busy meanwhile"
             if meta["other"] is not None else ""))
    # The ceiling is the best the cores do; a measurement disturbed by other
    # load only lowers it, so the document takes the higher of two.
    end_peak = qkv.peak()
    print(f"fp32 FMA ceiling measured again after the run: {end_peak:.0f} GFLOP/s"
          + (f" (the document uses it instead of {peak:.0f})" if end_peak > peak and a.write_doc else ""))
    peak = max(peak, end_peak)
    if a.write_doc:
        write_doc(markdown(meta, rows, peers, peak, brows, bpeers))
        print(f"wrote {os.path.relpath(DOC)}")
    qkv.lib.qkv_ctx_free(qkv.ctx)


if __name__ == "__main__":
    main()
