"""qkv.kvcache_attention and qkv.PagedCache: decoding from contiguous and
paged KV caches, against qkv.attention on the same keys."""
import numpy as np
import pytest

import qkv

try:
    import ml_dtypes  # noqa: F401
    CACHE_DTYPES = ["float32", "float16", "bfloat16", "int8"]
except ImportError:
    CACHE_DTYPES = ["float32", "float16", "int8"]


def problem(seed=0, B=3, S=300, Sq=2, Hq=8, Hkv=2, D=64):
    rng = np.random.default_rng(seed)
    kc = rng.standard_normal((B, S, Hkv, D)).astype(np.float32)
    vc = rng.standard_normal((B, S, Hkv, D)).astype(np.float32)
    q = rng.standard_normal((B, Sq, Hq, D)).astype(np.float32)
    lens = np.array([S // 3, S, 17][:B], np.int32)
    return q, kc, vc, lens


def test_kvcache_equals_attention_per_sequence():
    q, kc, vc, lens = problem()
    out, lse = qkv.kvcache_attention(q, kc, vc, lens, causal=True, return_lse=True)
    assert out.shape == q.shape and lse.shape == (3, 8, 2)
    for b, n in enumerate(lens):
        want, wl = qkv.attention(q[b:b + 1], kc[b:b + 1, :n], vc[b:b + 1, :n], causal=True,
                                 return_lse=True)
        assert np.abs(out[b] - want[0]).max() < 1e-5
        assert np.abs(lse[b] - wl[0]).max() < 1e-5


@pytest.mark.parametrize("dtype", CACHE_DTYPES)
@pytest.mark.parametrize("block", [8, 16, 256])
@pytest.mark.parametrize("head_major", [False, True])
def test_paged_cache(dtype, block, head_major):
    q, kc, vc, lens = problem(1)
    B, S, Hkv, D = kc.shape
    per = -(-S // block)
    cache = qkv.PagedCache(B * per + 1, block, Hkv, D, dtype=dtype, head_major=head_major)
    assert cache.k.shape[1:3] == ((Hkv, block) if head_major else (block, Hkv))
    # scattered blocks: sequence b owns ids b, b + B, b + 2B, ... (+1)
    table = (np.arange(per)[None, :] * B + np.arange(B)[:, None] + 1).astype(np.int32)
    half = S // 2
    cache.append(kc[:, :half], vc[:, :half], table, np.zeros(B, np.int32))
    cache.append(kc[:, half:], vc[:, half:], table, np.full(B, half, np.int32))
    if dtype == "int8":
        # one scale per row and head, laid out as the pool's blocks
        assert cache.k_scale.shape[1:] == cache.k.shape[1:3]
        b, p, h = 1, 3, Hkv - 1
        blk, row = table[b, p // block], p % block
        got = cache.k_scale[blk, h, row] if head_major else cache.k_scale[blk, row, h]
        assert np.isclose(got, np.abs(kc[b, p, h].astype(np.float32)).max() / 127, rtol=1e-6)
    out = cache.attention(q, table, lens, causal=True)
    want = qkv.kvcache_attention(q, kc, vc, lens, causal=True)
    if dtype == "float32":
        assert np.array_equal(out, want), "a float32 paged cache gives the contiguous result"
    else:
        # int8: each element off by at most 1/254 of its row's largest
        # magnitude; bf16/f16 by half an ulp (2^-9 / 2^-12)
        tol = {"int8": 0.05, "bfloat16": 0.02, "float16": 2e-3}[dtype]
        assert np.abs(out - want).max() < tol


def test_paged_errors():
    cache = qkv.PagedCache(4, 8, 1, 16, dtype="float32")
    k = np.zeros((1, 8, 1, 16), np.float32)
    with pytest.raises(qkv.Error, match="block"):
        cache.append(k, k, np.array([[7]], np.int32), np.zeros(1, np.int32))
    with pytest.raises(qkv.Error):
        cache.append(k, k, np.array([[0]], np.int32), np.array([3], np.int32))
    q = np.zeros((1, 1, 1, 16), np.float32)
    with pytest.raises(qkv.Error):
        cache.attention(q, np.array([[0]], np.int32), np.array([9], np.int32))
    with pytest.raises(ValueError, match="dtype"):
        qkv.PagedCache(4, 8, 1, 16, dtype="float64")


def test_empty_is_aligned_and_freed():
    import gc
    import ml_dtypes
    for shape, dt, align in [((3, 5), np.float32, 64), (7, np.int8, 64),
                             ((4, 1024, 8, 128), ml_dtypes.bfloat16, 2 << 20)]:
        a = qkv.empty(shape, dt)
        assert a.shape == (shape if isinstance(shape, tuple) else (shape,))
        assert a.dtype == np.dtype(dt) and a.flags.writeable and a.flags.c_contiguous
        assert a.ctypes.data % align == 0
        a[...] = 1
        view = a.reshape(-1)[::2]
        del a
        gc.collect()
        assert (np.asarray(view, np.float32) == 1).all()   # the view keeps it alive
    with pytest.raises(ValueError):
        qkv.empty((2, -1))
