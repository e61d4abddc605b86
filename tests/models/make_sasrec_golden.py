#!/usr/bin/env python3
"""Golden top-10 recommendations of SASRec (MovieLens-1M) for tests/test_models.c.

Builds the network of shared/models/sasrec-ml1m/README.md with PyTorch
modules (torch.nn.MultiheadAttention, Conv1d, as the checkpoint's model.py
at pmixer/SASRec.pytorch@fe6e9dc computes it), loads model.safetensors,
and writes tests/models/sasrec_golden.json: 24 item histories (fixed seed;
lengths 1 to 500, so both shorter and longer than maxlen = 200), with the
10 best next items and their scores for each.

    python tests/models/make_sasrec_golden.py [MODELS_DIR]  (default ../shared/models)

Needs: torch, numpy, safetensors.
"""
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn


class PointWiseFeedForward(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.conv1 = nn.Conv1d(hidden, hidden, kernel_size=1)
        self.conv2 = nn.Conv1d(hidden, hidden, kernel_size=1)

    def forward(self, x):                    # [b, t, c]
        y = self.conv2(torch.relu(self.conv1(x.transpose(-1, -2))))
        return y.transpose(-1, -2) + x


class SASRec(nn.Module):
    def __init__(self, item_num, hidden=50, blocks=2, heads=1, maxlen=200, eps=1e-8):
        super().__init__()
        self.item_emb = nn.Embedding(item_num + 1, hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(maxlen + 1, hidden, padding_idx=0)
        self.attention_layernorms = nn.ModuleList([nn.LayerNorm(hidden, eps=eps) for _ in range(blocks)])
        self.attention_layers = nn.ModuleList([nn.MultiheadAttention(hidden, heads) for _ in range(blocks)])
        self.forward_layernorms = nn.ModuleList([nn.LayerNorm(hidden, eps=eps) for _ in range(blocks)])
        self.forward_layers = nn.ModuleList([PointWiseFeedForward(hidden) for _ in range(blocks)])
        self.last_layernorm = nn.LayerNorm(hidden, eps=eps)

    def log2feats(self, seqs_ids):           # [b, maxlen] int64, 0 = pad
        seqs = self.item_emb(seqs_ids) * self.item_emb.embedding_dim ** 0.5
        poss = torch.arange(1, seqs_ids.shape[1] + 1).unsqueeze(0) * (seqs_ids != 0)
        seqs = seqs + self.pos_emb(poss)
        tl = seqs.shape[1]
        mask = ~torch.tril(torch.ones((tl, tl), dtype=torch.bool))
        for ln_a, attn, ln_f, ff in zip(self.attention_layernorms, self.attention_layers,
                                        self.forward_layernorms, self.forward_layers):
            seqs = seqs.transpose(0, 1)
            q = ln_a(seqs)
            out, _ = attn(q, seqs, seqs, attn_mask=mask, need_weights=False)
            seqs = (q + out).transpose(0, 1)
            seqs = ff(ln_f(seqs))
        return self.last_layernorm(seqs)

    def scores(self, seqs_ids):
        final = self.log2feats(seqs_ids)[:, -1, :]
        return final @ self.item_emb.weight[1:].T     # items 1..N


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "../shared/models"
    cfg = json.load(open(os.path.join(root, "sasrec-ml1m/config.json")))
    n_items, maxlen = cfg["item_num"], cfg["maxlen"]
    model = SASRec(n_items, cfg["hidden_units"], cfg["num_blocks"], cfg["num_heads"], maxlen,
                   cfg["layernorm_eps"])
    state = load_file(os.path.join(root, "sasrec-ml1m/model.safetensors"))
    model.load_state_dict(state)
    model.eval()
    rng = np.random.default_rng(1000)
    lengths = [1, 2, 3, 5, 8, 13, 20, 33, 50, 77, 100, 150, 199, 200, 201, 250, 333, 500,
               10, 40, 120, 180, 1, 60]
    cases = []
    for length in lengths:
        hist = rng.integers(1, n_items + 1, size=length).tolist()
        ids = ([0] * maxlen + hist)[-maxlen:]
        with torch.no_grad():
            sc = model.scores(torch.tensor([ids], dtype=torch.int64))[0]
        top = torch.topk(sc, 10)
        cases.append({"history": hist,
                      "top10": [int(i) + 1 for i in top.indices.tolist()],
                      "scores": [float("%.7g" % v) for v in top.values.tolist()]})
    out = {"model": "sasrec-ml1m (shared/models/sasrec-ml1m), PyTorch fp32", "cases": cases}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sasrec_golden.json")
    with open(path, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    print(f"{path}: {len(cases)} histories")


if __name__ == "__main__":
    main()
