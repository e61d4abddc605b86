"""qkv: exact transformer attention (FlashAttention-style, on the CPU).

    import qkv
    out = qkv.attention(q, k, v, causal=True)          # [B, S, H, D] arrays
    out, lse = qkv.attention(q, k, v, return_lse=True)
    dq, dk, dv = qkv.attention_backward(q, k, v, out, dout, lse)

q, k and v are NumPy arrays (float32, float16, or bfloat16 through
ml_dtypes) or PyTorch CPU tensors, in the [batch, seq, heads, head_dim]
layout, with any strides: they are passed to libqkv by pointer and strides,
never copied. Results come back as the same kind of array. For a drop-in
`scaled_dot_product_attention` with autograd, see `qkv.torch`.

Errors from the library raise `qkv.Error`, whose message names the argument
at fault. The GIL is released while libqkv computes.
"""
import ctypes

import numpy as np

from . import _lib
from ._lib import Error

__all__ = ["attention", "attention_backward", "reference", "Error", "version",
           "isa", "isa_names", "empty", "kvcache_attention", "PagedCache", "Model"]

__version__ = _lib.lib.qkv_version().decode()


def empty(shape, dtype=np.float32):
    """An uninitialized NumPy array in qkv_alloc memory: from 2 MiB up on
    transparent huge pages, which decoding streams faster than 4 KiB pages
    (the memory for KV caches). Freed when the array and its views are."""
    import weakref
    dt = np.dtype(dtype)
    shape = tuple(int(d) for d in (shape if np.ndim(shape) else (shape,)))
    if any(d < 0 for d in shape):
        raise ValueError(f"shape: negative dimension in {shape}")
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = max(count * dt.itemsize, 1)
    ptr = _lib.lib.qkv_alloc(nbytes)
    if not ptr:
        raise MemoryError(f"qkv_alloc({nbytes}) failed")
    buf = (ctypes.c_char * nbytes).from_address(ptr)
    weakref.finalize(buf, _lib.lib.qkv_free, ptr)
    return np.frombuffer(buf, dtype=dt, count=count).reshape(shape)


def version():
    """The version of the libqkv in use."""
    return _lib.lib.qkv_version().decode()


def isa(threads=None):
    """The kernel set a context uses ("avx512bf16", "amx", ...)."""
    return _lib.lib.qkv_ctx_isa(_lib.context(threads)).decode()


def isa_names():
    """The kernel sets this CPU runs, least preferred first."""
    out, i = [], 0
    while True:
        n = _lib.lib.qkv_isa_name(i)
        if n is None:
            return out
        if _lib.lib.qkv_isa_supported(n):
            out.append(n.decode())
        i += 1


# ---- arrays ------------------------------------------------------------------

def _is_torch(x):
    return type(x).__module__.split(".")[0] == "torch"


def _np_dtype(dt, name):
    if dt == np.float32:
        return _lib.F32
    if dt == np.float16:
        return _lib.F16
    if dt.name == "bfloat16":
        return _lib.BF16
    raise TypeError(f"{name}: dtype {dt} is not float32, float16 or bfloat16")


def _torch_dtype(dt, name):
    import torch
    m = {torch.float32: _lib.F32, torch.float16: _lib.F16, torch.bfloat16: _lib.BF16}
    if dt not in m:
        raise TypeError(f"{name}: dtype {dt} is not float32, float16 or bfloat16")
    return m[dt]


def _view(x, name, rank=4):
    """A qkv_tensor over x's memory: pointer, shape and element strides.
    rank 3 ([total, H, D], packed sequences) is viewed as [1, total, H, D]."""
    if _is_torch(x):
        if x.device.type != "cpu":
            raise ValueError(f"{name}: a {x.device.type} tensor; qkv computes on the CPU")
        dtype = _torch_dtype(x.dtype, name)
        shape, strides, ptr = list(x.shape), list(x.stride()), x.data_ptr()
    elif isinstance(x, np.ndarray):
        dtype = _np_dtype(x.dtype, name)
        size = x.dtype.itemsize
        if any(s % size for s in x.strides):
            raise ValueError(f"{name}: byte strides {x.strides} are not multiples of the "
                             f"element size {size}")
        shape, strides = list(x.shape), [s // size for s in x.strides]
        ptr = x.__array_interface__["data"][0]
    else:
        raise TypeError(f"{name}: expected a numpy.ndarray or a torch.Tensor, got "
                        f"{type(x).__name__}")
    if len(shape) != rank:
        raise ValueError(f"{name}: expected {rank} dimensions, got shape {tuple(shape)}")
    if rank == 3:
        shape, strides = [1] + shape, [0] + strides
    t = _lib.Tensor()
    t.data, t.dtype = ptr, dtype
    t.shape[:] = shape
    t.stride[:] = strides
    return t


def _empty(like, shape, dtype=None):
    """An uninitialized contiguous array of like's kind (dtype: like's)."""
    if _is_torch(like):
        import torch
        return torch.empty(shape, dtype=like.dtype if dtype is None else
                           getattr(torch, np.dtype(dtype).name))
    return np.empty(shape, dtype=like.dtype if dtype is None else dtype)


def _float_array(x, name):
    """x as float32, numpy or torch as it came, with its strides where it
    already is float32 (a copy otherwise); bool: True -> 0, False -> -inf."""
    if _is_torch(x):
        import torch
        x = x.detach()
        if x.dtype == torch.bool:
            return torch.zeros(x.shape, dtype=torch.float32).masked_fill_(~x, float("-inf"))
        return x if x.dtype == torch.float32 else x.to(torch.float32)
    x = np.asarray(x)
    if x.dtype == np.bool_:
        return np.where(x, np.float32(0), np.float32(-np.inf))
    return x if x.dtype == np.float32 else x.astype(np.float32)


def _ints(x, name):
    if _is_torch(x):
        x = x.detach().cpu().numpy()
    a = np.ascontiguousarray(x, dtype=np.int32)
    if a.ndim != 1 or a.size < 2:
        raise ValueError(f"{name}: expected n_seqs + 1 >= 2 offsets, got shape {a.shape}")
    return a


class _Call:
    """The options of one call and the arrays they point into (kept alive
    for the duration of the call)."""

    def check_heads(self, hq):
        """libqkv reads one ALiBi slope per query head through a bare
        pointer: their number is checked here."""
        if self.n_slopes is not None and self.n_slopes != hq:
            raise ValueError(f"alibi_slopes: {self.n_slopes} slopes for {hq} query heads")

    def __init__(self, q, causal, window, scale, softcap, alibi_slopes, bias,
                 cu_seqlens_q, cu_seqlens_k, dropout_p=0.0, dropout_seed=0):
        o = self.opts = _lib.lib.qkv_attn_opts_default()
        o.dropout_p = float(dropout_p)
        seed = int(dropout_seed)
        if not 0 <= seed < 1 << 64:
            raise ValueError(f"dropout_seed: {seed} is not in [0, 2**64)")
        o.dropout_seed = seed
        self.keep, self.n_slopes = [], None
        o.scale = 0.0 if scale is None else float(scale)
        o.causal = int(bool(causal))
        if window is None:
            window = (-1, -1)
        if len(window) != 2:
            raise ValueError(f"window: expected (left, right), got {window!r}")
        o.window_left, o.window_right = int(window[0]), int(window[1])
        o.softcap = float(softcap or 0.0)
        if alibi_slopes is not None:
            a = _float_array(alibi_slopes, "alibi_slopes")
            a = np.ascontiguousarray(a.numpy() if _is_torch(a) else a)
            if a.ndim != 1:
                raise ValueError(f"alibi_slopes: expected one slope per query head, got "
                                 f"shape {a.shape}")
            self.keep.append(a)
            self.n_slopes = a.size
            o.alibi_slopes = a.ctypes.data_as(_lib.P(ctypes.c_float))
        if bias is not None:
            b = _float_array(bias, "bias")
            if b.ndim > 4:
                raise ValueError(f"bias: more than 4 dimensions, shape {tuple(b.shape)}")
            while b.ndim < 4:
                b = b[None]
            bt = _view(b, "bias")
            self.keep += [b, bt]
            self.bias_shape = tuple(b.shape)
            o.bias = ctypes.pointer(bt)
        if (cu_seqlens_q is None) != (cu_seqlens_k is None):
            raise ValueError("cu_seqlens_q and cu_seqlens_k: give both or neither")
        self.varlen = cu_seqlens_q is not None
        if self.varlen:
            cq, ck = _ints(cu_seqlens_q, "cu_seqlens_q"), _ints(cu_seqlens_k, "cu_seqlens_k")
            if cq.size != ck.size:
                raise ValueError(f"cu_seqlens_q and cu_seqlens_k: {cq.size} and {ck.size} "
                                 "offsets")
            self.keep += [cq, ck]
            o.cu_seqlens_q = cq.ctypes.data_as(_lib.P(ctypes.c_int32))
            o.cu_seqlens_k = ck.ctypes.data_as(_lib.P(ctypes.c_int32))
            o.n_seqs = cq.size - 1


def _floats_ptr(a):
    if a is None:
        return None
    ptr = a.data_ptr() if _is_torch(a) else a.ctypes.data
    return ctypes.cast(ptr, _lib.P(ctypes.c_float))


def _lse_array(q, call, B, Sq, Hq):
    shape = (Hq, Sq) if call.varlen else (B, Hq, Sq)
    return _empty(q, shape, np.float32)


def _forward(fn, q, k, v, causal, window, scale, softcap, alibi_slopes, bias,
             cu_seqlens_q, cu_seqlens_k, return_lse, threads, dropout_p, dropout_seed):
    call = _Call(q, causal, window, scale, softcap, alibi_slopes, bias,
                 cu_seqlens_q, cu_seqlens_k, dropout_p, dropout_seed)
    rank = 3 if call.varlen and len(q.shape) == 3 else 4
    tq, tk, tv = _view(q, "q", rank), _view(k, "k", rank), _view(v, "v", rank)
    B, Sq, Hq, Dv = tq.shape[0], tq.shape[1], tq.shape[2], tv.shape[3]
    call.check_heads(Hq)
    out = _empty(q, (Sq, Hq, Dv) if rank == 3 else (B, Sq, Hq, Dv))
    to = _view(out, "out", rank)
    lse = _lse_array(q, call, B, Sq, Hq) if return_lse else None
    ctx = _lib.context(threads)
    st = fn(ctx, ctypes.byref(tq), ctypes.byref(tk), ctypes.byref(tv),
            ctypes.byref(call.opts), ctypes.byref(to), _floats_ptr(lse))
    _lib.check(st, ctx)
    return (out, lse) if return_lse else out


def attention(q, k, v, *, causal=False, window=(-1, -1), scale=None, softcap=0.0,
              alibi_slopes=None, bias=None, cu_seqlens_q=None, cu_seqlens_k=None,
              return_lse=False, threads=None, dropout_p=0.0, dropout_seed=0):
    """softmax(mask(q·kᵀ·scale))·v, exactly, in tiles (memory never grows
    with Sq·Sk).

    q [B, Sq, Hq, D], k [B, Sk, Hkv, D], v [B, Sk, Hkv, Dv]; Hq a multiple
    of Hkv (grouped-query heads). Packed variable-length batches: q, k, v
    are [total, H, D] (or batch 1) with cu_seqlens_q/cu_seqlens_k the
    n_seqs + 1 offsets of each sequence.

    causal and window (left, right; -1 unbounded) are bottom-right aligned
    as in FlashAttention: query i sits at key position i + Sk - Sq. scale
    defaults to 1/sqrt(D); softcap > 0 applies softcap·tanh(s/softcap);
    alibi_slopes [Hq] subtracts slope·|distance|; bias is added to the
    scores (float, or bool where False masks), broadcastable to
    [B, Hq, Sq, Sk] (lower ranks align to the right, size-1 dims
    broadcast).

    Returns out like q (last dim Dv), and with return_lse also the
    natural-log sum-exp of each row's scores, float32 [B, Hq, Sq] (varlen:
    [Hq, total]). A row that sees no key gets 0 and lse -inf. threads: the
    number of threads (default: one per core).

    dropout_p in [0, 1) drops each softmax element with that probability
    and scales the rest by 1/(1 - dropout_p) (training). The mask is a
    function of dropout_seed (an integer in [0, 2**64)) and the element's
    (batch, head, query row, key row) alone: pass the same seed to
    attention_backward. lse stays that of the softmax before dropout.
    """
    return _forward(_lib.lib.qkv_attention_forward, q, k, v, causal, window, scale, softcap,
                    alibi_slopes, bias, cu_seqlens_q, cu_seqlens_k, return_lse, threads,
                    dropout_p, dropout_seed)


def reference(q, k, v, *, causal=False, window=(-1, -1), scale=None, softcap=0.0,
              alibi_slopes=None, bias=None, cu_seqlens_q=None, cu_seqlens_k=None,
              return_lse=False, threads=None, dropout_p=0.0, dropout_seed=0):
    """attention() computed by the library's double-precision reference
    (plain loops; slow): the specification, for checking."""
    return _forward(_lib.lib.qkv_attention_reference, q, k, v, causal, window, scale,
                    softcap, alibi_slopes, bias, cu_seqlens_q, cu_seqlens_k, return_lse,
                    threads, dropout_p, dropout_seed)


def attention_backward(q, k, v, out, dout, lse, *, causal=False, window=(-1, -1),
                       scale=None, softcap=0.0, alibi_slopes=None, bias=None,
                       cu_seqlens_q=None, cu_seqlens_k=None, return_dbias=False,
                       threads=None, dropout_p=0.0, dropout_seed=0):
    """The gradients (dq, dk, dv) of attention() for the upstream gradient
    dout, from its inputs, its output and its lse (return_lse=True), with
    the same options. Scores are recomputed; results are bitwise identical
    for any thread count. For grouped heads dk and dv sum over each
    group's query heads. With return_dbias (a float bias required) also
    the bias's gradient, float32 of the bias's shape, summed over the
    dimensions it broadcasts: (dq, dk, dv, dbias). With dropout, give the
    forward's dropout_p and dropout_seed: the mask is regenerated."""
    call = _Call(q, causal, window, scale, softcap, alibi_slopes, bias,
                 cu_seqlens_q, cu_seqlens_k, dropout_p, dropout_seed)
    rank = 3 if call.varlen and len(q.shape) == 3 else 4
    views = [_view(x, n, rank) for x, n in ((q, "q"), (k, "k"), (v, "v"), (out, "out"),
                                            (dout, "dout"))]
    call.check_heads(views[0].shape[2])
    if lse is None:
        raise ValueError("lse: required (attention(..., return_lse=True) gives it)")
    want = (views[0].shape[2], views[0].shape[1]) if call.varlen else \
        (views[0].shape[0], views[0].shape[2], views[0].shape[1])
    if tuple(lse.shape) != want:
        raise ValueError(f"lse: expected shape {want}, got {tuple(lse.shape)}")
    lse = _float_array(lse, "lse")
    lse = lse.contiguous() if _is_torch(lse) else np.ascontiguousarray(lse)
    grads = [_empty(x, tuple(x.shape)) for x in (q, k, v)]
    gviews = [_view(g, n, rank) for g, n in zip(grads, ("dq", "dk", "dv"))]
    args = [ctypes.byref(t) for t in views] + [_floats_ptr(lse), ctypes.byref(call.opts)] + \
        [ctypes.byref(t) for t in gviews]
    ctx = _lib.context(threads)
    if return_dbias:
        if bias is None:
            raise ValueError("return_dbias: there is no bias to differentiate")
        bshape = tuple(call.bias_shape)
        dbias = _empty(q, bshape, np.float32)
        dview = _view(dbias, "dbias")
        st = _lib.lib.qkv_attention_backward_dbias(ctx, *args, ctypes.byref(dview))
        _lib.check(st, ctx)
        return tuple(grads) + (dbias.reshape(tuple(bias.shape)),)
    st = _lib.lib.qkv_attention_backward(ctx, *args)
    _lib.check(st, ctx)
    return tuple(grads)


from .serving import kvcache_attention, PagedCache  # noqa: E402
from .models import Model  # noqa: E402
