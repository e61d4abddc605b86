#!/usr/bin/env python3
"""Swaps qkv into a small PyTorch transformer with one line and shows that
the outputs and the gradients match PyTorch's own attention, and the time
each took.

    python examples/torch_swap.py        # after `make test` (.venv has qkv)

The model is torch.nn.TransformerEncoderLayer-like, written out so that its
attention call is the function F.scaled_dot_product_attention, the one
qkv.torch replaces.
"""
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import qkv.torch


class Block(nn.Module):
    def __init__(self, dim=256, heads=8, kv_heads=2):
        super().__init__()
        self.h, self.hkv, self.d = heads, kv_heads, dim // heads
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.d)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, attention):
        B, S, _ = x.shape
        q, k, v = self.qkv(self.n1(x)).split([self.h * self.d, self.hkv * self.d,
                                              self.hkv * self.d], dim=-1)
        q = q.view(B, S, self.h, self.d).transpose(1, 2)      # [B, H, S, D] views
        k = k.view(B, S, self.hkv, self.d).transpose(1, 2)
        v = v.view(B, S, self.hkv, self.d).transpose(1, 2)
        a = attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, S, -1))
        return x + self.mlp(self.n2(x))


def run(model, x, attention):
    for p in model.parameters():
        p.grad = None
    start = time.perf_counter()
    y = x
    for blk in model:
        y = blk(y, attention)
    fwd = time.perf_counter() - start
    y.square().mean().backward()
    total = time.perf_counter() - start
    return y.detach(), [p.grad.clone() for p in model.parameters()], fwd, total


def main():
    torch.manual_seed(0)
    model = nn.ModuleList(Block() for _ in range(4))
    x = torch.randn(4, 1024, 256)
    results = {}
    for name, fn in (("torch", F.scaled_dot_product_attention),
                     ("qkv", qkv.torch.scaled_dot_product_attention)):
        run(model, x, fn)                                   # warm-up
        times = [run(model, x, fn) for _ in range(3)]
        y, grads = times[-1][0], times[-1][1]
        fwd = sorted(t[2] for t in times)[1]
        tot = sorted(t[3] for t in times)[1]
        results[name] = (y, grads)
        print(f"{name:6s} forward {1e3 * fwd:7.1f} ms   forward+backward {1e3 * tot:7.1f} ms "
              f"(median of 3; 4 blocks, B=4, S=1024, 8 query / 2 kv heads, causal)")
    y0, g0 = results["torch"]
    y1, g1 = results["qkv"]
    out_err = ((y1 - y0).abs().max() / y0.abs().max()).item()
    grad_err = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                   for a, b in zip(g1, g0))
    print(f"largest difference: output {out_err:.2e}, parameter gradients {grad_err:.2e} "
          "(relative to the largest value)")
    if out_err > 1e-4 or grad_err > 1e-3:
        raise SystemExit("outputs differ more than fp32 rounding explains")


if __name__ == "__main__":
    main()
