"""qkv.torch.scaled_dot_product_attention against PyTorch's own, forward
and gradients, and qkv.attention on torch tensors. Skipped without torch.

Judged against float64: PyTorch's math path computes the reference in
float64 on the same (rounded) inputs; qkv's largest error must be within
twice PyTorch's own kernel's error in the same dtype, or within
torch.testing's default tolerance for that dtype (scaled by the largest
reference value), whichever is larger."""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import qkv  # noqa: E402
import qkv.torch as qt  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1.3e-6 + 1e-5, torch.bfloat16: 1.6e-2 + 1e-5,
       torch.float16: 1e-3 + 1e-5}


def rel_err(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def sdpa_case(shape, dtype, grads=True, seed=0, **kw):
    """Runs qkv's and torch's SDPA and the float64 reference; checks the
    outputs and (grads) dq, dk, dv."""
    B, Hq, Hkv, L, S, E, Ev = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, E, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, E, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, Ev, generator=g).to(dtype)
    dout = torch.randn(B, Hq, L, Ev, generator=g).to(dtype)
    mask = kw.pop("attn_mask", None)
    res = {}
    for name, fn, dt in (("qkv", qt.scaled_dot_product_attention, dtype),
                         ("torch", F.scaled_dot_product_attention, dtype),
                         ("ref", F.scaled_dot_product_attention, torch.float64)):
        xs = [t.detach().to(dt).requires_grad_(grads) for t in (q, k, v)]
        m = mask
        if m is not None and m.dtype != torch.bool:
            m = m.to(dt)
        out = fn(*xs, attn_mask=m, enable_gqa=Hq != Hkv, **kw)
        assert out.dtype == dt and out.shape == (B, Hq, L, Ev)
        gr = torch.autograd.grad(out, xs, dout.to(dt)) if grads else ()
        res[name] = [out.detach()] + [x.detach() for x in gr]
    for i, what in enumerate(["out", "dq", "dk", "dv"][:len(res["ref"])]):
        ref = res["ref"][i]
        e_qkv, e_torch = rel_err(res["qkv"][i], ref), rel_err(res["torch"][i], ref)
        bound = max(2 * e_torch, TOL[dtype] * (10 if i else 1))
        assert e_qkv <= bound, (f"{what}: qkv error {e_qkv:.3g}, torch {e_torch:.3g} "
                                f"({dtype}, {shape}, {kw})")


SHAPES = [  # B, Hq, Hkv, L, S, E, Ev
    (1, 1, 1, 1, 1, 8, 8), (2, 2, 2, 5, 7, 16, 16), (1, 4, 2, 17, 33, 24, 24),
    (2, 8, 2, 33, 9, 7, 5), (1, 4, 1, 70, 130, 32, 40), (1, 3, 3, 129, 65, 80, 16),
    (1, 4, 4, 256, 256, 64, 64),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_sdpa_shapes(shape, dtype):
    sdpa_case(shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("LS", [(16, 16), (9, 30), (30, 9)], ids=str)
def test_sdpa_is_causal_top_left(LS, dtype):
    """PyTorch's is_causal is top-left aligned even when L != S."""
    L, S = LS
    sdpa_case((2, 4, 2, L, S, 32, 32), dtype, is_causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["bool", "float", "bool-2d", "float-bcast"])
def test_sdpa_attn_mask(kind, dtype):
    B, H, L, S = 2, 4, 23, 31
    g = torch.Generator().manual_seed(4)
    if kind.startswith("bool"):
        m = torch.rand((L, S) if kind == "bool-2d" else (B, H, L, S), generator=g) > 0.4
        m[..., 0] = True   # every row sees a key (PyTorch gives NaN otherwise)
    else:
        m = torch.randn((B, 1, 1, S) if kind == "float-bcast" else (B, H, L, S), generator=g)
    sdpa_case((B, H, H, L, S, 32, 32), dtype, attn_mask=m)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sdpa_scale_and_3d(dtype):
    sdpa_case((2, 2, 2, 19, 27, 32, 16), dtype, scale=0.37)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 12, 16, generator=g).to(dtype) for _ in range(3))
    a = qt.scaled_dot_product_attention(q, k, v, is_causal=True)
    b = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert a.shape == (3, 12, 16) and rel_err(a, b) <= TOL[dtype]


def test_sdpa_gradients_flow_into_a_model():
    """The result is a node of the autograd graph: gradients reach
    parameters upstream of it."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 96)
    x = torch.randn(2, 10, 32)
    q, k, v = lin(x).view(2, 10, 3, 2, 16).permute(2, 0, 3, 1, 4)
    qt.scaled_dot_product_attention(q, k, v, is_causal=True).square().sum().backward()
    g1 = lin.weight.grad.clone()
    lin.weight.grad = None
    q, k, v = lin(x).view(2, 10, 3, 2, 16).permute(2, 0, 3, 1, 4)
    F.scaled_dot_product_attention(q, k, v, is_causal=True).square().sum().backward()
    assert torch.allclose(g1, lin.weight.grad, rtol=1e-4, atol=1e-5)


def test_sdpa_errors():
    q = torch.randn(1, 4, 8, 16)
    k = torch.randn(1, 2, 8, 16)
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match="dropout_p"):
            qt.scaled_dot_product_attention(q, q, q, dropout_p=p)
    with pytest.raises(ValueError, match="enable_gqa"):
        qt.scaled_dot_product_attention(q, k, k)
    with pytest.raises(ValueError, match="is_causal"):
        qt.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(8, 8, dtype=torch.bool),
                                        is_causal=True)
    with pytest.raises(TypeError, match="dtypes"):
        qt.scaled_dot_product_attention(q, q.double(), q)
    with pytest.raises(qkv.Error, match="shape"):
        qt.scaled_dot_product_attention(q, q, q[..., :4, :])


def test_attention_on_torch_tensors():
    """qkv.attention takes and returns torch tensors in [B, S, H, D]."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 20, 4, 32, generator=g)
    k = torch.randn(2, 25, 2, 32, generator=g)
    out, lse = qkv.attention(q, k, k, causal=True, return_lse=True)
    assert isinstance(out, torch.Tensor) and isinstance(lse, torch.Tensor)
    want = qkv.attention(q.numpy(), k.numpy(), k.numpy(), causal=True)
    assert np.array_equal(out.numpy(), want)
    dq, dk, dv = qkv.attention_backward(q, k, k, out, torch.ones_like(out), lse, causal=True)
    assert isinstance(dq, torch.Tensor) and dk.shape == k.shape


def test_sdpa_strided_inputs():
    """Views as models make them (slices of a packed projection, heads by
    transpose, kv heads broadcast by expand) give PyTorch's results, and
    their gradients land in the packed tensor."""
    g = torch.Generator().manual_seed(8)
    B, S, H, D = 2, 33, 4, 16
    proj = torch.randn(B, S, 3 * H * D, generator=g, requires_grad=True)
    res = []
    for fn in (qt.scaled_dot_product_attention, F.scaled_dot_product_attention):
        q, k, v = proj.view(B, S, 3, H, D).permute(2, 0, 3, 1, 4)
        k1 = k[:, :1].expand(B, H, S, D)                 # stride 0 over heads
        out = fn(q, k1, v, is_causal=True)
        gr, = torch.autograd.grad(out.square().sum(), proj)
        res.append((out.detach(), gr))
    assert torch.allclose(res[0][0], res[1][0], rtol=1e-5, atol=1e-5)
    assert torch.allclose(res[0][1], res[1][1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 4, 23, 31), (1, 4, 23, 31), (2, 1, 1, 31), (23, 31)],
                         ids=str)
def test_sdpa_attn_mask_gradient(shape, dtype):
    """A float mask that requires grad (a learned bias) gets PyTorch's
    gradient, summed over the dimensions it broadcasts."""
    B, H, L, S = 2, 4, 23, 31
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(B, H, n, 32, generator=g).to(dtype) for n in (L, S, S))
    m0 = torch.randn(shape, generator=g).to(dtype)
    dout = torch.randn(B, H, L, 32, generator=g).to(dtype)
    grads = {}
    for name, fn, dt in (("qkv", qt.scaled_dot_product_attention, dtype),
                         ("torch", F.scaled_dot_product_attention, dtype),
                         ("ref", F.scaled_dot_product_attention, torch.float64)):
        m = m0.to(dt).requires_grad_(True)
        out = fn(q.to(dt), k.to(dt), v.to(dt), attn_mask=m)
        grads[name], = torch.autograd.grad(out, m, dout.to(dt))
    assert grads["qkv"].shape == m0.shape and grads["qkv"].dtype == dtype
    e_qkv, e_torch = rel_err(grads["qkv"], grads["ref"]), rel_err(grads["torch"], grads["ref"])
    assert e_qkv <= max(2 * e_torch, 10 * TOL[dtype]), (e_qkv, e_torch)


def test_sdpa_3d_mask():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, 12, 16, generator=g) for _ in range(3))
    m = torch.randn(3, 12, 12, generator=g)
    a = qt.scaled_dot_product_attention(q, k, v, attn_mask=m)
    b = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def _dropout_mask(B, H, L, S, p, seed):
    """The mask qkv.torch draws after torch.manual_seed(seed), read off the
    output: q = 0 makes the softmax uniform (1/S) and v = the identity
    (Ev = S) gives out[..., i, j] = Z[i, j] / S."""
    q = torch.zeros(B, H, L, 4)
    k = torch.randn(B, H, S, 4)
    v = torch.eye(S).expand(B, H, S, S).contiguous()
    torch.manual_seed(seed)
    return qt.scaled_dot_product_attention(q, k, v, dropout_p=p).double() * S


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("causal,gqa,bias", [(False, False, False), (True, True, False),
                                             (False, True, True)])
def test_sdpa_dropout_against_masked_softmax(p, causal, gqa, bias):
    """out and the gradients (of a float attn_mask too) equal float64
    autograd through softmax · Z · v, with qkv's own mask Z (read off the
    output with the same seed)."""
    B, Hq, Hkv, L, S, E = 2, 4, 2 if gqa else 4, 9, 13, 16
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, h, n, E, generator=g)
               for h, n in ((Hq, L), (Hkv, S), (Hkv, S)))
    # top-left causal with L < S runs on the first L keys: the mask's key
    # positions are those of that call (the other keys have P = 0)
    Sm = min(L, S) if causal else S
    z = _dropout_mask(B, Hq, L, Sm, p, 77)
    # every element is 0 or 1/(1 - p) (the library's fp32 factor): snap the
    # read-off values to them
    scale = float(1 / (1 - torch.tensor(p, dtype=torch.float64)).float())
    assert bool(((z == 0) | ((z - scale).abs() < 1e-5 * scale)).all())
    z = (z != 0).double() * scale
    z = torch.cat([z, torch.ones(B, Hq, L, S - Sm, dtype=torch.float64)], -1)
    m = torch.randn(L, S, generator=g) if bias else None
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    ms = m.clone().requires_grad_() if bias else None
    torch.manual_seed(77)
    out = qt.scaled_dot_product_attention(qs, ks, vs, attn_mask=ms, dropout_p=p,
                                          is_causal=causal, enable_gqa=gqa)
    dout = torch.randn(out.shape, generator=g)
    out.backward(dout)
    qd, kd, vd = (t.double().clone().requires_grad_() for t in (q, k, v))
    md = m.double().clone().requires_grad_() if bias else None
    rep = Hq // Hkv
    s = qd @ kd.repeat_interleave(rep, 1).transpose(-1, -2) / math.sqrt(E)
    if causal:
        s = s.masked_fill(torch.ones(L, S, dtype=torch.bool).triu(1), float("-inf"))
    if bias:
        s = s + md
    ref = (torch.softmax(s, -1) * z) @ vd.repeat_interleave(rep, 1)
    ref.backward(dout.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    pairs = [(qs, qd), (ks, kd), (vs, vd)] + ([(ms, md)] if bias else [])
    for got, want in pairs:
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-4)


def test_sdpa_dropout_seeding_and_rate():
    """torch.manual_seed repeats the mask, another seed changes it, and the
    kept fraction is 1 - p within 5 sigma."""
    a = _dropout_mask(2, 3, 40, 50, 0.3, 5)
    b = _dropout_mask(2, 3, 40, 50, 0.3, 5)
    c = _dropout_mask(2, 3, 40, 50, 0.3, 6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    n = a.numel()
    kept = int((a != 0).sum())
    assert abs(kept - 0.7 * n) <= 5 * math.sqrt(n * 0.3 * 0.7)



def test_sdpa_dropout_one_gives_zeros():
    """dropout_p = 1 drops every weight: zeros and zero gradients, mask
    gradient included, as PyTorch's."""
    q, k, v = (torch.randn(2, 3, 5, 8, requires_grad=True) for _ in range(3))
    m = torch.randn(5, 5, requires_grad=True)
    out = qt.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=1.0)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=1.0)
    assert out.shape == ref.shape and not out.any()
    out.sum().backward()
    for t in (q, k, v, m):
        assert t.grad is not None and not t.grad.any()
