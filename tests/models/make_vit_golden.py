#!/usr/bin/env python3
"""Golden predictions of ViT4MNIST for tests/test_models.c.

Builds the network of shared/models/vit4mnist/README.md as PyTorch modules
(the layout of the vit_pytorch.py it was trained with), loads
model.safetensors, classifies the 10,000 MNIST test images and writes
tests/models/vit_golden.json: the predicted digit of every image (a
string of 10,000 digits), the accuracy, and the logits of the first 32
images.

    python tests/models/make_vit_golden.py [MODELS_DIR]   (default ../shared/models)

Needs: torch, numpy, safetensors.
"""
import gzip
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.scale = dim ** -0.5          # this checkpoint: dim, not head_dim
        self.to_qkv = nn.Linear(dim, dim * 3, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2) * self.scale).softmax(dim=-1)
        out = (att @ v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class PreNorm(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.norm(x))


class Residual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


class FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        return self.net(x)


class Transformer(nn.Module):
    def __init__(self, dim, depth, heads, mlp_dim):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.ModuleList([Residual(PreNorm(dim, Attention(dim, heads))),
                           Residual(PreNorm(dim, FeedForward(dim, mlp_dim)))])
            for _ in range(depth)])

    def forward(self, x):
        for attn, ff in self.layers:
            x = ff(attn(x))
        return x


class ViT(nn.Module):
    def __init__(self, image_size=28, patch_size=7, num_classes=10, dim=64, depth=6,
                 heads=8, mlp_dim=128):
        super().__init__()
        self.patch_size = patch_size
        n = (image_size // patch_size) ** 2
        self.pos_embedding = nn.Parameter(torch.zeros(1, n + 1, dim))
        self.patch_to_embedding = nn.Linear(patch_size * patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.transformer = Transformer(dim, depth, heads, mlp_dim)
        self.mlp_head = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(),
                                      nn.Linear(mlp_dim, num_classes))

    def forward(self, img):                       # [b, 1, 28, 28]
        p = self.patch_size
        b, c, h, w = img.shape
        x = img.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        x = x.reshape(b, (h // p) * (w // p), p * p * c)
        x = self.patch_to_embedding(x)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.pos_embedding
        x = self.transformer(x)
        return self.mlp_head(x[:, 0])


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic == 2051:
        n, r, c = (int.from_bytes(data[i:i + 4], "big") for i in (4, 8, 12))
        return np.frombuffer(data, np.uint8, offset=16).reshape(n, r, c)
    n = int.from_bytes(data[4:8], "big")
    return np.frombuffer(data, np.uint8, offset=8)[:n]


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "../shared/models"
    model = ViT()
    model.load_state_dict(load_file(os.path.join(root, "vit4mnist/model.safetensors")))
    model.eval()
    images = read_idx(os.path.join(root, "mnist/t10k-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(root, "mnist/t10k-labels-idx1-ubyte.gz"))
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    x = ((x - 0.1307) / 0.3081).unsqueeze(1)
    with torch.no_grad():
        logits = torch.cat([model(x[i:i + 500]) for i in range(0, len(x), 500)])
    pred = logits.argmax(dim=1).numpy()
    correct = int((pred == labels).sum())
    out = {
        "model": "vit4mnist (shared/models/vit4mnist), PyTorch fp32",
        "images": len(pred),
        "correct": correct,
        "predictions": "".join(str(int(p)) for p in pred),
        "logits_first": [[float("%.7g" % v) for v in row] for row in logits[:32].tolist()],
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vit_golden.json")
    with open(path, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    print(f"{path}: {correct}/{len(pred)} correct ({100.0 * correct / len(pred):.2f} %)")


if __name__ == "__main__":
    main()
