"""qkv.attention and qkv.attention_backward on NumPy arrays, against a
float64 NumPy implementation of the same contract written here (no torch
needed)."""
import threading
import time

import numpy as np
import pytest

import qkv

try:
    import ml_dtypes
except ImportError:   # bfloat16 arrays need ml_dtypes
    ml_dtypes = None

DTYPES = ["float32", "float16"] + (["bfloat16"] if ml_dtypes else [])
# torch.testing's default tolerances per dtype (rtol, atol), applied to
# values scaled by the largest |reference| (attention outputs are convex
# combinations of v rows, so the largest value sets the rounding scale)
TOL = {"float32": (1.3e-6, 1e-5), "float16": (1e-3, 1e-3), "bfloat16": (1.6e-2, 8e-3)}


def np_dtype(name):
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def ref_attention(q, k, v, causal=False, window=(-1, -1), scale=None, softcap=0.0,
                  alibi=None, bias=None):
    """float64 attention in [B, S, H, D], bottom-right aligned masks; rows
    that see no key give 0 and lse -inf. Returns out, lse, P."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    g = Hq // Hkv
    k = np.repeat(k, g, axis=2)
    v = np.repeat(v, g, axis=2)
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    s = np.einsum("bihd,bjhd->bhij", q, k) * scale
    if softcap:
        s = softcap * np.tanh(s / softcap)
    i = np.arange(Sq)[:, None] + Sk - Sq
    j = np.arange(Sk)[None, :]
    if alibi is not None:
        s = s - np.asarray(alibi, np.float64)[None, :, None, None] * np.abs(i - j)
    if bias is not None:
        s = s + np.asarray(bias, np.float64)
    vis = np.ones((Sq, Sk), bool)
    if causal:
        vis &= j <= i
    if window[0] >= 0:
        vis &= j >= i - window[0]
    if window[1] >= 0:
        vis &= j <= i + window[1]
    s = np.where(vis, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    l = e.sum(axis=-1, keepdims=True)
    p = np.where(l > 0, e / np.where(l > 0, l, 1), 0.0)
    out = np.einsum("bhij,bjhd->bihd", p, v)
    with np.errstate(divide="ignore"):
        lse = np.where(l[..., 0] > 0, np.log(np.where(l[..., 0] > 0, l[..., 0], 1)) +
                       m[..., 0], -np.inf)
    return out, lse, p


def ref_backward(q, k, v, dout, scale=None, **kw):
    """float64 gradients through the same formulas (no softcap)."""
    out, lse, p = ref_attention(q, k, v, scale=scale, **kw)
    q, k, v, dout = (np.asarray(x, dtype=np.float64) for x in (q, k, v, dout))
    D = q.shape[3]
    g = q.shape[2] // k.shape[2]
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    kr, vr = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    dv = np.einsum("bhij,bihd->bjhd", p, dout)
    dp = np.einsum("bihd,bjhd->bhij", dout, vr)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = np.einsum("bhij,bjhd->bihd", ds, kr) * scale
    dk = np.einsum("bhij,bihd->bjhd", ds, q) * scale
    fold = lambda t: t.reshape(t.shape[0], t.shape[1], -1, g, t.shape[3]).sum(3)
    return dq, fold(dk), fold(dv)


def rand(rng, shape, dtype):
    return rng.standard_normal(shape).astype(np_dtype(dtype))


def close(got, ref, dtype, what):
    rtol, atol = TOL[dtype]
    got = np.asarray(got, np.float64)
    scale = max(np.abs(ref).max(), 1e-30)
    err = np.abs(got - ref)
    bad = err > atol * scale + rtol * np.abs(ref)
    assert not bad.any(), (f"{what}: {bad.sum()} of {bad.size} out of tolerance, worst "
                           f"{err.max():.3g} (max|ref| {scale:.3g})")


SHAPES = [  # B, Sq, Sk, Hq, Hkv, D, Dv
    (1, 1, 1, 1, 1, 8, 8), (2, 5, 7, 2, 2, 16, 16), (1, 17, 33, 4, 2, 24, 24),
    (2, 33, 9, 8, 2, 7, 5), (1, 70, 130, 4, 1, 32, 40), (1, 129, 65, 3, 3, 80, 16),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_shapes(shape, dtype):
    B, Sq, Sk, Hq, Hkv, D, Dv = shape
    rng = np.random.default_rng(sum(shape))
    q, k, v = rand(rng, (B, Sq, Hq, D), dtype), rand(rng, (B, Sk, Hkv, D), dtype), \
        rand(rng, (B, Sk, Hkv, Dv), dtype)
    out, lse = qkv.attention(q, k, v, return_lse=True)
    assert out.dtype == q.dtype and out.shape == (B, Sq, Hq, Dv)
    assert lse.dtype == np.float32 and lse.shape == (B, Hq, Sq)
    ro, rl, _ = ref_attention(q, k, v)
    close(out, ro, dtype, "out")
    close(lse, rl, "float32" if dtype == "float32" else "float16", "lse")


OPTIONS = [
    dict(causal=True), dict(window=(5, 0)), dict(window=(3, 4)), dict(scale=0.3),
    dict(softcap=2.0), dict(alibi=True), dict(bias="float"), dict(bias="bool"),
    dict(causal=True, window=(8, -1), softcap=5.0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_options(opt, dtype):
    B, Sq, Sk, Hq, Hkv, D = 2, 37, 53, 4, 2, 32
    rng = np.random.default_rng(7)
    q, k, v = rand(rng, (B, Sq, Hq, D), dtype), rand(rng, (B, Sk, Hkv, D), dtype), \
        rand(rng, (B, Sk, Hkv, D), dtype)
    kw, rkw = dict(opt), dict(opt)
    if opt.get("alibi"):
        slopes = np.float32(2.0) ** -np.arange(1, Hq + 1, dtype=np.float32)
        kw["alibi_slopes"] = slopes
        rkw["alibi"] = slopes
        del kw["alibi"]
    if "bias" in opt:
        if opt["bias"] == "float":
            b = rng.standard_normal((B, 1, Sq, Sk)).astype(np.float32)
            kw["bias"], rkw["bias"] = b, b
        else:   # bool, [Sq, Sk], True takes part; keep key 0 visible
            m = rng.random((Sq, Sk)) > 0.3
            m[:, 0] = True
            kw["bias"] = m
            rkw["bias"] = np.where(m, 0.0, -np.inf)
    out, lse = qkv.attention(q, k, v, return_lse=True, **kw)
    ro, rl, _ = ref_attention(q, k, v, **rkw)
    close(out, ro, dtype, "out")
    assert np.array_equal(np.isinf(lse), np.isinf(rl))


def test_strided_views_equal_contiguous():
    """Inputs read in place through any strides: packed QKV, [B,H,S,D]
    transposes, reversed and step-2 views give the contiguous result."""
    rng = np.random.default_rng(3)
    B, S, H, D = 2, 40, 4, 16
    packed = rng.standard_normal((B, S, 3, H, D)).astype(np.float32)
    q, k, v = packed[:, :, 0], packed[:, :, 1], packed[:, :, 2]
    want = qkv.attention(*(np.ascontiguousarray(x) for x in (q, k, v)), causal=True)
    assert np.array_equal(qkv.attention(q, k, v, causal=True), want)
    bhsd = np.ascontiguousarray(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    assert np.array_equal(qkv.attention(bhsd, k, v, causal=True), want)
    rev = np.ascontiguousarray(k[:, :, :, ::-1])[:, :, :, ::-1]
    assert np.array_equal(qkv.attention(q, rev, v, causal=True), want)
    wide = np.zeros((B, S, H, 2 * D), np.float32)
    wide[..., ::2] = v
    assert np.array_equal(qkv.attention(q, k, wide[..., ::2], causal=True), want)


def test_varlen_equals_per_sequence():
    rng = np.random.default_rng(5)
    lens_q, lens_k = [3, 17, 1, 40], [5, 17, 9, 41]
    H, D = 2, 16
    cq, ck = np.cumsum([0] + lens_q), np.cumsum([0] + lens_k)
    q = rng.standard_normal((cq[-1], H, D)).astype(np.float32)
    k = rng.standard_normal((ck[-1], H, D)).astype(np.float32)
    v = rng.standard_normal((ck[-1], H, D)).astype(np.float32)
    out, lse = qkv.attention(q, k, v, causal=True, cu_seqlens_q=cq, cu_seqlens_k=ck,
                             return_lse=True)
    assert out.shape == q.shape and lse.shape == (H, cq[-1])
    for s in range(len(lens_q)):
        o = qkv.attention(q[None, cq[s]:cq[s + 1]], k[None, ck[s]:ck[s + 1]],
                          v[None, ck[s]:ck[s + 1]], causal=True)
        assert np.array_equal(out[cq[s]:cq[s + 1]], o[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[1:])
def test_backward(shape, dtype):
    B, Sq, Sk, Hq, Hkv, D, Dv = shape
    rng = np.random.default_rng(11 + sum(shape))
    q, k, v = rand(rng, (B, Sq, Hq, D), dtype), rand(rng, (B, Sk, Hkv, D), dtype), \
        rand(rng, (B, Sk, Hkv, Dv), dtype)
    dout = rand(rng, (B, Sq, Hq, Dv), dtype)
    out, lse = qkv.attention(q, k, v, causal=True, return_lse=True)
    grads = qkv.attention_backward(q, k, v, out, dout, lse, causal=True)
    ref = ref_backward(q, k, v, dout, causal=True)
    for name, g, r, x in zip(("dq", "dk", "dv"), grads, ref, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype
        rtol, atol = TOL[dtype]
        # a gradient element sums Sq or Sk products: scale by the largest
        err = np.abs(np.asarray(g, np.float64) - r).max() / max(np.abs(r).max(), 1e-30)
        assert err <= 10 * (atol + rtol), f"{name}: relative error {err:.3g}"


def test_threads_bitwise():
    rng = np.random.default_rng(9)
    q = rng.standard_normal((2, 300, 4, 64)).astype(np.float32)
    k = rng.standard_normal((2, 333, 2, 64)).astype(np.float32)
    v = rng.standard_normal((2, 333, 2, 64)).astype(np.float32)
    outs = [qkv.attention(q, k, v, causal=True, threads=t) for t in (1, 2, 3, 5)]
    for o in outs[1:]:
        assert np.array_equal(o, outs[0])


def test_empty_rows_zero_and_minus_inf():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 4, 1, 8)).astype(np.float32)
    k = rng.standard_normal((1, 6, 1, 8)).astype(np.float32)
    out, lse = qkv.attention(q, k, k, window=(0, 0), causal=True,
                             bias=np.full((4, 6), -np.inf, np.float32), return_lse=True)
    assert np.array_equal(out, np.zeros_like(out)) and np.all(lse == -np.inf)


def test_errors_name_the_argument():
    q = np.zeros((1, 4, 2, 8), np.float32)
    k = np.zeros((1, 5, 2, 8), np.float32)
    with pytest.raises(qkv.Error, match=r"shape") as e:
        qkv.attention(q, k, k[:, :, :1])
    assert e.value.status < 0 and e.value.status_name
    with pytest.raises(qkv.Error, match=r"window"):
        qkv.attention(q, k, k, window=(-5, 0))
    with pytest.raises(TypeError, match=r"q: dtype"):
        qkv.attention(q.astype(np.float64), k, k)
    with pytest.raises(qkv.Error, match=r"dtype"):
        qkv.attention(q, k.astype(np.float16), k)
    with pytest.raises(ValueError, match=r"alibi_slopes: 3 slopes for 2"):
        qkv.attention(q, k, k, alibi_slopes=np.ones(3, np.float32))
    with pytest.raises(ValueError, match=r"expected 4 dimensions"):
        qkv.attention(q[0], k, k)
    with pytest.raises(TypeError, match=r"numpy.ndarray or a torch.Tensor"):
        qkv.attention(q.tolist(), k, k)
    with pytest.raises(ValueError, match=r"give both"):
        qkv.attention(q, k, k, cu_seqlens_q=[0, 4])
    with pytest.raises(qkv.Error, match=r"cu_seqlens"):
        qkv.attention(q[0], k[0], k[0], cu_seqlens_q=[0, 9], cu_seqlens_k=[0, 5])
    with pytest.raises(ValueError, match=r"lse: expected shape"):
        qkv.attention_backward(q, k, k, q, q, np.zeros((1, 2, 5), np.float32))


def test_gil_released():
    """Another Python thread keeps running while the library computes."""
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 2048, 8, 64)).astype(np.float32)
    ticks, done = [0], threading.Event()

    def count():
        while not done.is_set():
            ticks[0] += 1
            time.sleep(0)

    t = threading.Thread(target=count)
    t.start()
    time.sleep(0.01)
    before = ticks[0]
    start = time.perf_counter()
    qkv.attention(q, q, q, threads=1)
    elapsed = time.perf_counter() - start
    after = ticks[0]
    done.set()
    t.join()
    assert elapsed > 0.02, "the call was too short to tell"
    assert after - before > 10, f"{after - before} ticks in {elapsed:.3f} s"


def test_inputs_are_not_copied():
    """Only the output is allocated: the inputs (strided views included)
    are read in place. numpy reports its allocations to tracemalloc."""
    import tracemalloc
    rng = np.random.default_rng(4)
    B, S, H, D = 1, 512, 8, 64
    packed = rng.standard_normal((B, S, 3, H, D)).astype(np.float32)   # 3 MB
    q, k, v = packed[:, :, 0], packed[:, :, 1], packed[:, :, 2]         # strided views
    qkv.attention(q, k, v)          # contexts and scratch made outside the trace
    tracemalloc.start()
    out = qkv.attention(q, k, v)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < out.nbytes + 64 * 1024, f"{peak} bytes allocated for a {out.nbytes}-byte output"


@pytest.mark.parametrize("bshape", [(2, 4, 37, 53), (1, 1, 37, 53), (2, 1, 1, 53), (37, 53)],
                         ids=str)
def test_backward_dbias(bshape):
    """The bias gradient: dS summed over the bias's broadcast dimensions,
    against the float64 formulas."""
    rng = np.random.default_rng(12)
    B, Sq, Sk, Hq, Hkv, D = 2, 37, 53, 4, 2, 16
    q = rng.standard_normal((B, Sq, Hq, D)).astype(np.float32)
    k = rng.standard_normal((B, Sk, Hkv, D)).astype(np.float32)
    v = rng.standard_normal((B, Sk, Hkv, D)).astype(np.float32)
    dout = rng.standard_normal((B, Sq, Hq, D)).astype(np.float32)
    bias = rng.standard_normal(bshape).astype(np.float32)
    out, lse = qkv.attention(q, k, v, bias=bias, causal=True, return_lse=True)
    dq, dk, dv, db = qkv.attention_backward(q, k, v, out, dout, lse, bias=bias, causal=True,
                                            return_dbias=True)
    assert db.shape == bias.shape and db.dtype == np.float32
    _, _, p = ref_attention(q, k, v, bias=bias, causal=True)
    g = Hq // Hkv
    dp = np.einsum("bihd,bjhd->bhij", dout.astype(np.float64), np.repeat(v, g, axis=2))
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))          # [B, Hq, Sq, Sk]
    b4 = (1,) * (4 - len(bshape)) + tuple(bshape)
    want = ds.sum(axis=tuple(d for d in range(4) if b4[d] == 1), keepdims=True).reshape(bshape)
    assert np.abs(db - want).max() <= 1e-5 * max(np.abs(want).max(), np.abs(ds).max())
    plain = qkv.attention_backward(q, k, v, out, dout, lse, bias=bias, causal=True)
    for a, b in zip(plain, (dq, dk, dv)):
        assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="no bias"):
        qkv.attention_backward(q, k, v, out, dout, lse, causal=True, return_dbias=True)


def test_attention_dropout_matches_reference():
    """qkv.attention with dropout equals qkv.reference with the same seed,
    and attention_backward with it equals the dense autograd gradients."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, n, 2, 8)).astype(np.float32) for n in (7, 11, 11))
    out, lse = qkv.attention(q, k, v, dropout_p=0.25, dropout_seed=2**63 + 5, return_lse=True)
    ref = qkv.reference(q, k, v, dropout_p=0.25, dropout_seed=2**63 + 5)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    plain = qkv.attention(q, k, v)
    assert not np.allclose(out, plain)
    _, lse0 = qkv.attention(q, k, v, return_lse=True)
    np.testing.assert_array_equal(lse, lse0)   # the softmax's, before dropout
    dout = rng.standard_normal(out.shape).astype(np.float32)
    grads = qkv.attention_backward(q, k, v, out, dout, lse, dropout_p=0.25,
                                   dropout_seed=2**63 + 5)
    assert all(np.isfinite(g).all() for g in grads)
    with pytest.raises(ValueError, match="dropout_seed"):
        qkv.attention(q, k, v, dropout_p=0.1, dropout_seed=-1)
    with pytest.raises(qkv.Error, match="dropout_p"):
        qkv.attention(q, k, v, dropout_p=1.0)
