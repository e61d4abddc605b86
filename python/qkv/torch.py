"""qkv.torch: a drop-in for torch.nn.functional.scaled_dot_product_attention
on CPU tensors, differentiable through qkv's backward.

    import qkv.torch
    F.scaled_dot_product_attention = qkv.torch.scaled_dot_product_attention

Same signature and [B, H, S, D] semantics as PyTorch's, including its
top-left aligned `is_causal` and `enable_gqa`. q, k and v are passed to
libqkv by strides, never copied; the output is a contiguous [B, H, L, Ev]
tensor. A float attn_mask that requires grad gets its gradient (summed over
the dimensions it broadcasts). dropout_p > 0 drops softmax elements as
PyTorch does in training, with a mask that qkv derives from a seed drawn
from torch's default generator (so torch.manual_seed makes it repeat) and
regenerates in the backward; the mask differs from PyTorch's own random
stream (dropout_p = 1 gives zeros and zero gradients, as PyTorch's).
Difference: a query row that every mask entry hides gets 0 rather than
NaN.
"""
import ctypes
import math

import torch

from . import _lib
from . import _view, _Call, _floats_ptr

__all__ = ["scaled_dot_product_attention"]


def _bhsd(t, name):
    """A [B, H, S, D] tensor as qkv's [B, S, H, D] view (strides swapped)."""
    return _view(t.transpose(1, 2), name)


def _bias32(mask):
    """The mask as qkv's fp32 additive bias (bool: False -> -inf), padded
    to 4 dimensions; None stays None."""
    if mask is None:
        return None
    b = mask.detach()
    if b.dtype == torch.bool:
        b = torch.zeros(b.shape, dtype=torch.float32).masked_fill_(~b, float("-inf"))
    elif b.dtype != torch.float32:
        b = b.to(torch.float32)
    while b.dim() < 4:
        b = b.unsqueeze(0)
    return b


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(fctx, q, k, v, mask, causal, window_right, scale, threads, dropout):
        fctx.all_dropped = dropout[0] == 1.0
        if fctx.all_dropped:   # as PyTorch: every weight dropped, zeros
            fctx.mask_shape = None if mask is None else (tuple(mask.shape), mask.dtype)
            fctx.save_for_backward(q, k, v)
            return torch.zeros((q.shape[0], q.shape[1], q.shape[2], v.shape[3]), dtype=q.dtype)
        bias = _bias32(mask)
        call = _Call(q, causal, (-1, window_right), scale, 0.0, None, bias, None, None,
                     *dropout)
        B, H, L, Ev = q.shape[0], q.shape[1], q.shape[2], v.shape[3]
        out = torch.empty((B, H, L, Ev), dtype=q.dtype)
        lse = torch.empty((B, H, L), dtype=torch.float32)
        tq, tk, tv, to = (_bhsd(t, n) for t, n in ((q, "query"), (k, "key"), (v, "value"),
                                                    (out, "out")))
        ctx = _lib.context(threads)
        st = _lib.lib.qkv_attention_forward(ctx, ctypes.byref(tq), ctypes.byref(tk),
                                            ctypes.byref(tv), ctypes.byref(call.opts),
                                            ctypes.byref(to), _floats_ptr(lse))
        _lib.check(st, ctx)
        fctx.save_for_backward(q, k, v, out, lse)
        fctx.bias, fctx.causal, fctx.window_right = bias, causal, window_right
        fctx.scale, fctx.threads, fctx.dropout = scale, threads, dropout
        fctx.mask_shape = None if mask is None else (tuple(mask.shape), mask.dtype)
        return out

    @staticmethod
    def backward(fctx, dout):
        if fctx.all_dropped:
            q, k, v = fctx.saved_tensors
            dmask = None
            if fctx.needs_input_grad[3]:
                shape, dtype = fctx.mask_shape
                dmask = torch.zeros(shape, dtype=dtype)
            return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dmask,
                    None, None, None, None, None)
        q, k, v, out, lse = fctx.saved_tensors
        call = _Call(q, fctx.causal, (-1, fctx.window_right), fctx.scale, 0.0, None,
                     fctx.bias, None, None, *fctx.dropout)
        dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype) for t in (q, k, v))
        views = [_bhsd(t, n) for t, n in ((q, "query"), (k, "key"), (v, "value"),
                                          (out, "out"), (dout, "grad"))]
        gviews = [_bhsd(t, n) for t, n in ((dq, "dq"), (dk, "dk"), (dv, "dv"))]
        args = [ctypes.byref(t) for t in views] + [_floats_ptr(lse), ctypes.byref(call.opts)] \
            + [ctypes.byref(t) for t in gviews]
        ctx = _lib.context(fctx.threads)
        dmask = None
        if fctx.needs_input_grad[3]:
            dbias = torch.empty(fctx.bias.shape, dtype=torch.float32)
            dview = _view(dbias, "attn_mask gradient")
            st = _lib.lib.qkv_attention_backward_dbias(ctx, *args, ctypes.byref(dview))
            shape, dtype = fctx.mask_shape
            dmask = dbias.reshape(shape).to(dtype)
        else:
            st = _lib.lib.qkv_attention_backward(ctx, *args)
        _lib.check(st, ctx)
        return dq, dk, dv, dmask, None, None, None, None, None


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False):
    """torch.nn.functional.scaled_dot_product_attention computed by qkv.

    query [B, Hq, L, E], key [B, Hkv, S, E], value [B, Hkv, S, Ev] (or
    without the head dimension: [B, L, E]); CPU tensors of one dtype,
    float32, float16 or bfloat16. attn_mask: bool (True takes part) or
    float (added to the scores), broadcastable to [B, Hq, L, S]. is_causal:
    query i sees keys j <= i (top-left, as PyTorch). scale: default
    1/sqrt(E). enable_gqa: Hq may be a multiple of Hkv. dropout_p in
    [0, 1]: the softmax's elements dropped with that probability, the rest
    scaled by 1/(1 - dropout_p); the mask's seed comes from torch's default
    generator.
    """
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p: {dropout_p} is not in [0, 1]")
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask and is_causal: give one or the other, as in PyTorch")
    for t, n in ((query, "query"), (key, "key"), (value, "value")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{n}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() not in (3, 4):
            raise ValueError(f"{n}: expected [B, H, S, D] or [B, S, D], got shape "
                             f"{tuple(t.shape)}")
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError("query, key and value: different numbers of dimensions")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key and value: dtypes {query.dtype}, {key.dtype}, "
                        f"{value.dtype} differ")
    squeeze = query.dim() == 3
    if squeeze:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if attn_mask is not None and attn_mask.dim() == 3:   # [N, L, S]
            attn_mask = attn_mask.unsqueeze(1)
    Hq, Hkv = query.shape[1], key.shape[1]
    if Hq != Hkv and not enable_gqa:
        raise ValueError(f"query and key: {Hq} and {Hkv} heads; pass enable_gqa=True for "
                         "grouped-query attention")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query and key: {Hq} query heads are not a multiple of {Hkv} key "
                         "heads")
    L, S = query.shape[2], key.shape[2]
    causal, window_right, k, v = False, -1, key, value
    if is_causal:
        # top-left: query i sees keys j <= i. qkv aligns bottom-right (query
        # i at key position i + S - L), so L == S is its causal mask, L > S
        # a right window of L - S, and L < S its causal mask over the first
        # L keys (no query sees the others; autograd gives them zero
        # gradients through the slice)
        if L == S:
            causal = True
        elif L > S:
            window_right = L - S
        else:
            causal = True
            k, v = key[:, :, :L], value[:, :, :L]
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    if attn_mask is not None and attn_mask.dtype != torch.bool and \
            not attn_mask.dtype.is_floating_point:
        raise TypeError(f"attn_mask: dtype {attn_mask.dtype} is neither bool nor floating")
    # the mask's seed, from torch's generator: torch.manual_seed repeats it
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64)) if 0.0 < dropout_p < 1.0 else 0
    out = _Attention.apply(query, k, v, attn_mask, causal, window_right, float(scale),
                           torch.get_num_threads(), (dropout_p, seed))
    return out.squeeze(1) if squeeze else out
