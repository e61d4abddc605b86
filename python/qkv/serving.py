"""Decoding from KV caches: qkv.kvcache_attention over a contiguous cache,
and qkv.PagedCache, a vLLM-style paged cache (fp32, fp16, bf16 or int8
rows) with append and attention."""
import ctypes

import numpy as np

from . import _lib
from . import _Call, _empty, _floats_ptr, _is_torch, _view, empty

P = ctypes.POINTER
KV_DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2, "int8": 16}


class _Paged(ctypes.Structure):
    """qkv_paged_cache."""
    _fields_ = [("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
                ("k_scale", P(ctypes.c_float)), ("v_scale", P(ctypes.c_float)),
                ("dtype", ctypes.c_int), ("n_blocks", ctypes.c_int64),
                ("block_size", ctypes.c_int64), ("heads_kv", ctypes.c_int64),
                ("head_dim", ctypes.c_int64), ("head_dim_v", ctypes.c_int64),
                ("head_major", ctypes.c_int)]


_T = P(_lib.Tensor)
_SIGS = {
    "qkv_attention_kvcache": ([ctypes.c_void_p, _T, _T, _T, P(ctypes.c_int32), P(_lib.Opts),
                               _T, P(ctypes.c_float)], ctypes.c_int),
    "qkv_paged_append": ([ctypes.c_void_p, P(_Paged), P(ctypes.c_int32), ctypes.c_int64,
                          P(ctypes.c_int32), _T, _T], ctypes.c_int),
    "qkv_attention_paged": ([ctypes.c_void_p, _T, P(_Paged), P(ctypes.c_int32),
                             ctypes.c_int64, P(ctypes.c_int32), P(_lib.Opts), _T,
                             P(ctypes.c_float)], ctypes.c_int),
}


_lib.bind(_SIGS)


def _fn(name):
    return getattr(_lib.lib, name)


def _int32(x, name, ndim):
    if x is None:
        return None
    if _is_torch(x):
        x = x.detach().cpu().numpy()
    a = np.ascontiguousarray(x, dtype=np.int32)
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimension(s), got shape {a.shape}")
    return a


def _iptr(a):
    return None if a is None else a.ctypes.data_as(P(ctypes.c_int32))


def kvcache_attention(q, k_cache, v_cache, seqlens_k=None, *, causal=False,
                      window=(-1, -1), scale=None, softcap=0.0, alibi_slopes=None,
                      return_lse=False, threads=None):
    """Attention of q [B, Sq, Hq, D] (the newest Sq tokens of each
    sequence) over a contiguous cache k_cache [B, Smax, Hkv, D], v_cache
    [B, Smax, Hkv, Dv]: sequence b's keys are its first seqlens_k[b] rows
    (None: all Smax), the new tokens' rows among them. Query i sits at
    position seqlens_k[b] - Sq + i (causal, windows and ALiBi measure from
    there). Returns out like q (and lse [B, Hq, Sq] with return_lse)."""
    call = _Call(q, causal, window, scale, softcap, alibi_slopes, None, None, None)
    tq, tk, tv = _view(q, "q"), _view(k_cache, "k_cache"), _view(v_cache, "v_cache")
    B, Sq, Hq, Dv = tq.shape[0], tq.shape[1], tq.shape[2], tv.shape[3]
    call.check_heads(Hq)
    lens = _int32(seqlens_k, "seqlens_k", 1)
    if lens is not None and lens.size != B:
        raise ValueError(f"seqlens_k: {lens.size} lengths for a batch of {B}")
    out = _empty(q, (B, Sq, Hq, Dv))
    to = _view(out, "out")
    lse = _empty(q, (B, Hq, Sq), np.float32) if return_lse else None
    ctx = _lib.context(threads)
    st = _fn("qkv_attention_kvcache")(ctx, ctypes.byref(tq), ctypes.byref(tk), ctypes.byref(tv),
                                      _iptr(lens), ctypes.byref(call.opts), ctypes.byref(to),
                                      _floats_ptr(lse))
    _lib.check(st, ctx)
    return (out, lse) if return_lse else out


class PagedCache:
    """A paged KV cache owned by Python: pools k [n_blocks, block_size,
    heads_kv, head_dim] and v (NumPy arrays; int8 rows with one float32
    scale per row and head in k_scale / v_scale [n_blocks, block_size,
    heads_kv]), or with head_major=True [n_blocks, heads_kv, block_size,
    head_dim] (scales [n_blocks, heads_kv, block_size]), each head's rows
    of a block together: the layout that decodes faster from memory
    (docs/PERFORMANCE.md).
    Sequences address it through block tables, int32 [B, max_blocks]
    arrays of block ids the caller manages (blocks may be shared for
    reading)."""

    def __init__(self, n_blocks, block_size, heads_kv, head_dim, head_dim_v=None,
                 dtype="bfloat16", head_major=False):
        if dtype not in KV_DTYPES:
            raise ValueError(f"dtype: one of {', '.join(KV_DTYPES)}, got {dtype!r}")
        head_dim_v = head_dim if head_dim_v is None else head_dim_v
        if dtype == "bfloat16":
            import ml_dtypes
            npdt = np.dtype(ml_dtypes.bfloat16)
        else:
            npdt = np.dtype(dtype)
        self.dtype = dtype
        # pools in qkv_alloc memory (huge pages), zeroed
        self.head_major = bool(head_major)
        mid = (heads_kv, block_size) if self.head_major else (block_size, heads_kv)
        self.k = empty((n_blocks, *mid, head_dim), npdt)
        self.v = empty((n_blocks, *mid, head_dim_v), npdt)
        self.k[...] = 0
        self.v[...] = 0
        self.k_scale = self.v_scale = None
        if dtype == "int8":
            self.k_scale = np.zeros((n_blocks, *mid), np.float32)
            self.v_scale = np.zeros((n_blocks, *mid), np.float32)
        c = self._c = _Paged()
        c.k, c.v = self.k.ctypes.data, self.v.ctypes.data
        if self.k_scale is not None:
            c.k_scale = self.k_scale.ctypes.data_as(P(ctypes.c_float))
            c.v_scale = self.v_scale.ctypes.data_as(P(ctypes.c_float))
        c.dtype = KV_DTYPES[dtype]
        c.n_blocks, c.block_size, c.heads_kv = n_blocks, block_size, heads_kv
        c.head_dim, c.head_dim_v = head_dim, head_dim_v
        c.head_major = int(self.head_major)

    def append(self, k_new, v_new, block_table, seqlens, threads=None):
        """Writes k_new [B, Snew, Hkv, D] and v_new into positions
        seqlens[b] .. seqlens[b] + Snew - 1 of each sequence (seqlens is
        not changed; add Snew yourself)."""
        table, lens = _int32(block_table, "block_table", 2), _int32(seqlens, "seqlens", 1)
        tk, tv = _view(k_new, "k_new"), _view(v_new, "v_new")
        if table.shape[0] != tk.shape[0] or lens.size != tk.shape[0]:
            raise ValueError(f"block_table and seqlens: need {tk.shape[0]} rows, got "
                             f"{table.shape[0]} and {lens.size}")
        ctx = _lib.context(threads)
        st = _fn("qkv_paged_append")(ctx, ctypes.byref(self._c), _iptr(table), table.shape[1],
                                     _iptr(lens), ctypes.byref(tk), ctypes.byref(tv))
        _lib.check(st, ctx)

    def attention(self, q, block_table, seqlens_k, *, causal=False, window=(-1, -1),
                  scale=None, softcap=0.0, alibi_slopes=None, return_lse=False,
                  threads=None):
        """kvcache_attention over this cache: sequence b's keys are its
        positions 0 .. seqlens_k[b] - 1, found through block_table[b]."""
        call = _Call(q, causal, window, scale, softcap, alibi_slopes, None, None, None)
        table, lens = _int32(block_table, "block_table", 2), _int32(seqlens_k, "seqlens_k", 1)
        tq = _view(q, "q")
        B, Sq, Hq = tq.shape[0], tq.shape[1], tq.shape[2]
        call.check_heads(Hq)
        if table.shape[0] != B or lens.size != B:
            raise ValueError(f"block_table and seqlens_k: need {B} rows, got "
                             f"{table.shape[0]} and {lens.size}")
        out = _empty(q, (B, Sq, Hq, self._c.head_dim_v))
        to = _view(out, "out")
        lse = _empty(q, (B, Hq, Sq), np.float32) if return_lse else None
        ctx = _lib.context(threads)
        st = _fn("qkv_attention_paged")(ctx, ctypes.byref(tq), ctypes.byref(self._c),
                                        _iptr(table), table.shape[1], _iptr(lens),
                                        ctypes.byref(call.opts), ctypes.byref(to),
                                        _floats_ptr(lse))
        _lib.check(st, ctx)
        return (out, lse) if return_lse else out
