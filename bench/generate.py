#!/usr/bin/env python3
"""Text generation with stories260K: qkv beside a NumPy Llama with a KV cache.

qkv runs `qkv generate` (greedy, -n 256) on one prompt (batch 1) and on 32
prompts at once (batch 32: continuous batching over one paged KV pool);
its --json counters give the tokens/s of the decode phase and how the
forward's thread-time splits between attention (the KV-cache appends and
qkv's attention calls) and the rest (matrix products, norms, RoPE,
SwiGLU, sampling is outside). The peer is a plain NumPy implementation of
the Hugging Face Llama forward (split-half RoPE) with a KV cache, batched
with one matrix product per layer over the live sequences, reading the
Hugging Face folder that `qkv convert-llama` writes from the checkpoint:
so its agreement with qkv also checks the converter.

It checks first (the greedy ids of both, every prompt, must be equal),
then times --reps runs of each (alternating) and reports medians.

    python bench/generate.py [--qkv build/qkv] [--lib build/libqkv.so] [--model M.bin]
        [--threads 2] [--steps 256] [--reps 5] [--write-doc]

--write-doc rewrites the section between <!-- generate:begin --> and
<!-- generate:end --> in docs/PERFORMANCE.md. Needs numpy.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from docsection import write_section  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "PERFORMANCE.md")
BEGIN, END = "<!-- generate:begin -->", "<!-- generate:end -->"

PROMPTS = [
    "Once upon a time", "Lily and Tom", "The little dog", "One day, a bird",
    "There was a big tree", "Sara wanted to", "The sun was hot", "A cat named Tom",
    "Tim had a red ball", "Mom said", "The boy was sad", "In the park",
    "Ben and his dad", "It was a rainy day", "The girl found a box", "A big bear",
    "Sue liked to sing", "The car was fast", "Max saw a frog", "Anna had a doll",
    "The sky was blue", "Jack and Jill", "A little fish", "The old man",
    "Once there was a king", "The kids played", "Amy lost her hat", "A duck swam",
    "The baby cried", "Sam went to school", "The flower was pretty", "Lucy and her mom",
]


def find_model(arg):
    if arg:
        return arg
    root = os.environ.get("QKV_MODELS") or os.path.join(ROOT, "..", "shared", "models")
    return os.path.join(root, "stories260K", "stories260K.bin")


# ---- the NumPy peer ------------------------------------------------------------

def load_hf(folder):
    """config.json and model.safetensors (F32) as NumPy arrays."""
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(folder, "model.safetensors"), "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    w = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        assert t["dtype"] == "F32", name
        a, b = t["data_offsets"]
        w[name] = np.frombuffer(data[a:b], dtype=np.float32).reshape(t["shape"])
    return cfg, w


class NumpyLlama:
    """The Hugging Face Llama forward in float32 with a KV cache."""

    def __init__(self, folder):
        cfg, w = load_hf(folder)
        self.D = cfg["hidden_size"]
        self.L = cfg["num_hidden_layers"]
        self.Hq = cfg["num_attention_heads"]
        self.Hkv = cfg["num_key_value_heads"]
        self.hs = cfg.get("head_dim", self.D // self.Hq)
        self.S = cfg["max_position_embeddings"]
        self.eps = cfg["rms_norm_eps"]
        self.emb = w["model.embed_tokens.weight"]
        self.cls = self.emb if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
        self.norm = w["model.norm.weight"]
        self.layers = []
        for l in range(self.L):
            p = f"model.layers.{l}."
            g = lambda n: w[p + n]
            self.layers.append(dict(
                att_norm=g("input_layernorm.weight"), ffn_norm=g("post_attention_layernorm.weight"),
                wqkv=np.concatenate([g("self_attn.q_proj.weight"), g("self_attn.k_proj.weight"),
                                     g("self_attn.v_proj.weight")]).T.copy(),
                wo=g("self_attn.o_proj.weight").T.copy(),
                w13=np.concatenate([g("mlp.gate_proj.weight"), g("mlp.up_proj.weight")]).T.copy(),
                w2=g("mlp.down_proj.weight").T.copy()))
        inv = cfg.get("rope_theta", 10000.0) ** (-np.arange(0, self.hs, 2) / self.hs)
        ang = np.arange(self.S)[:, None] * inv[None, :]
        self.cos = np.concatenate([np.cos(ang), np.cos(ang)], 1).astype(np.float32)
        self.sin = np.concatenate([np.sin(ang), np.sin(ang)], 1).astype(np.float32)

    def rms(self, x, w):
        return w * (x / np.sqrt(np.mean(x * x, -1, keepdims=True) + self.eps))

    def rope(self, x, pos):
        """x [..., H, hs] at positions pos [...]: rotate the halves."""
        h = self.hs // 2
        rot = np.concatenate([-x[..., h:], x[..., :h]], -1)
        return x * self.cos[pos][..., None, :] + rot * self.sin[pos][..., None, :]

    def new_cache(self, B):
        shape = (self.L, B, self.S, self.Hkv, self.hs)
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    def ffn(self, x, y):
        h = self.rms(x, y["ffn_norm"])
        gu = h @ y["w13"]
        F = gu.shape[-1] // 2
        g = gu[..., :F]
        return x + (g / (1 + np.exp(-g)) * gu[..., F:]) @ y["w2"]

    def prefill(self, ids, kc, vc, b):
        """ids of sequence b (cache slot b): logits after the last."""
        T, D, Hq, Hkv, hs = len(ids), self.D, self.Hq, self.Hkv, self.hs
        x = self.emb[ids]
        pos = np.arange(T)
        mask = np.triu(np.full((T, T), -np.inf, np.float32), 1)
        for l, y in enumerate(self.layers):
            qkv = self.rms(x, y["att_norm"]) @ y["wqkv"]
            q = self.rope(qkv[:, :Hq * hs].reshape(T, Hq, hs), pos)
            k = self.rope(qkv[:, Hq * hs:(Hq + Hkv) * hs].reshape(T, Hkv, hs), pos)
            v = qkv[:, (Hq + Hkv) * hs:].reshape(T, Hkv, hs)
            kc[l, b, :T], vc[l, b, :T] = k, v
            qg = q.reshape(T, Hkv, Hq // Hkv, hs)
            s = np.einsum("tkgd,ukd->kgtu", qg, k) / np.sqrt(hs) + mask
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            o = np.einsum("kgtu,ukd->tkgd", p, v).reshape(T, Hq * hs)
            x = self.ffn(x + o @ y["wo"], y)
        return self.rms(x[-1], self.norm) @ self.cls.T

    def decode(self, tok, pos, kc, vc, slots):
        """One token per live sequence: tok [B], pos [B], their cache slots."""
        B, Hq, Hkv, hs = len(tok), self.Hq, self.Hkv, self.hs
        x = self.emb[tok]
        n = int(pos.max()) + 1
        mask = np.where(np.arange(n)[None, :] <= pos[:, None], 0.0, -np.inf).astype(np.float32)
        for l, y in enumerate(self.layers):
            qkv = self.rms(x, y["att_norm"]) @ y["wqkv"]
            q = self.rope(qkv[:, :Hq * hs].reshape(B, Hq, hs), pos)
            k = self.rope(qkv[:, Hq * hs:(Hq + Hkv) * hs].reshape(B, Hkv, hs), pos)
            kc[l, slots, pos], vc[l, slots, pos] = k, qkv[:, (Hq + Hkv) * hs:].reshape(B, Hkv, hs)
            K, V = kc[l, slots, :n], vc[l, slots, :n]
            qg = q.reshape(B, Hkv, Hq // Hkv, hs)
            s = np.einsum("bkgd,btkd->bkgt", qg, K) / np.sqrt(hs) + mask[:, None, None, :]
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            o = np.einsum("bkgt,btkd->bkgd", p, V).reshape(B, Hq * hs)
            x = self.ffn(x + o @ y["wo"], y)
        return self.rms(x, self.norm) @ self.cls.T


def tokenize(lib, model, prompts):
    """BOS + each prompt's ids, from libqkv (qkv_model_tokenize)."""
    import ctypes
    q = ctypes.CDLL(lib)
    q.qkv_ctx_create.restype = ctypes.c_void_p
    q.qkv_model_load.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    q.qkv_model_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p,
                                     ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    q.qkv_model_free.argtypes = [ctypes.c_void_p]
    q.qkv_ctx_free.argtypes = [ctypes.c_void_p]
    ctx = q.qkv_ctx_create(1)
    m = ctypes.c_void_p()
    if q.qkv_model_load(ctx, model.encode(), ctypes.byref(m)) != 0:
        sys.exit(f"generate.py: cannot load {model} through {lib}")
    out = []
    for p in prompts:
        ids = (ctypes.c_int32 * 4096)()
        n = ctypes.c_int64()
        q.qkv_model_tokenize(ctx, m, p.encode(), ids, 4096, ctypes.byref(n))
        out.append(list(ids[:n.value]))
    q.qkv_model_free(m)
    q.qkv_ctx_free(ctx)
    return out


def numpy_generate(m, prompt_ids, steps):
    """Greedy, llama2.c's -n rule, stop at BOS or EOS; returns (ids, prefill s,
    decode s, generated tokens)."""
    B = len(prompt_ids)
    kc, vc = m.new_cache(B)
    out = [list(p) for p in prompt_ids]
    t0 = time.perf_counter()
    logits = np.stack([m.prefill(np.array(p), kc, vc, b) for b, p in enumerate(prompt_ids)])
    t1 = time.perf_counter()
    live = list(range(B))
    generated = 0
    while live:
        nxt = logits.argmax(-1)
        keep = []
        for i, b in enumerate(live):
            t = int(nxt[i])
            if t in (1, 2):
                continue
            out[b].append(t)
            generated += 1
            if len(out[b]) - 1 < steps:   # positions cached = len - 1 after appending
                keep.append((b, t))
        if not keep:
            break
        live = [b for b, _ in keep]
        tok = np.array([t for _, t in keep])
        pos = np.array([len(out[b]) - 1 for b in live])
        logits = m.decode(tok, pos, kc, vc, np.array(live))
    t2 = time.perf_counter()
    return out, t1 - t0, t2 - t1, generated


# ---- qkv --------------------------------------------------------------------------

def qkv_generate(qkv, model, prompts, steps, threads):
    """One `qkv generate` run: (ids per prompt, counters)."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(prompts) + "\n")
        path = f.name
    try:
        cmd = [qkv, "generate", "-m", model, "-t", "0", "-n", str(steps), "--ids", "--json",
               "--threads", str(threads), "--batch", str(len(prompts))]
        cmd += ["-b", path] if len(prompts) > 1 else ["-p", prompts[0]]
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    finally:
        os.unlink(path)
    ids = [[int(t) for t in line.split()] for line in r.stdout.splitlines() if line.strip()]
    stats = json.loads([l for l in r.stderr.splitlines() if l.startswith("{")][-1])
    return ids, stats


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qkv", default=os.path.join(ROOT, "build", "qkv"))
    ap.add_argument("--lib", default=os.path.join(ROOT, "build", "libqkv.so"))
    ap.add_argument("--model")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--write-doc", action="store_true")
    a = ap.parse_args()
    model = find_model(a.model)
    if not os.path.exists(model):
        sys.exit(f"generate.py: {model} not found (set QKV_MODELS or --model)")
    tmp = tempfile.mkdtemp(prefix="qkv_bench_hf_")
    subprocess.run([a.qkv, "convert-llama", model, tmp], check=True, capture_output=True)
    peer = NumpyLlama(tmp)

    # check: the greedy ids of both, every prompt
    batches = {1: PROMPTS[:1], 32: PROMPTS}
    qids, _ = qkv_generate(a.qkv, model, PROMPTS, a.steps, a.threads)
    prompt_ids = tokenize(a.lib, model, PROMPTS)
    nids, _, _, _ = numpy_generate(peer, prompt_ids, a.steps)
    same = sum(x == y for x, y in zip(qids, nids))
    print(f"check: {same}/{len(PROMPTS)} greedy texts of {a.steps} positions identical "
          f"(qkv vs NumPy on the converted folder)")
    if same != len(PROMPTS):
        sys.exit("generate.py: qkv and the NumPy peer disagree; not timing")

    rows = []
    for B, prompts in batches.items():
        q, n = [], []
        for _ in range(a.reps):
            _, st = qkv_generate(a.qkv, model, prompts, a.steps, a.threads)
            q.append(st)
            _, pre, dec, gen = numpy_generate(peer, prompt_ids[:B], a.steps)
            n.append((pre, dec, gen))
        dec_rate = statistics.median(s["generated"] / (s["wall_s"] - s["prefill_s"]) for s in q)
        pre_rate = statistics.median(s["prompt_tokens"] / s["prefill_s"] for s in q)
        att = statistics.median(s["attention_s"] / s["compute_s"] for s in q)
        ms_tok = statistics.median(1e3 * s["compute_s"] / max(1, s["decode_tokens"] +
                                                               s["prompt_tokens"]) for s in q)
        np_rate = statistics.median(g / d for _, d, g in n)
        np_pre = statistics.median(sum(len(p) for p in prompt_ids[:B]) / p for p, _, _ in n)
        rows.append(dict(B=B, tok=q[0]["generated"], qkv=dec_rate, qkv_pre=pre_rate, att=att,
                         ms_tok=ms_tok, np=np_rate, np_pre=np_pre))
        print(f"batch {B:2d}: qkv {dec_rate:8.0f} tok/s (prompt {pre_rate:7.0f} tok/s), "
              f"attention {100 * att:4.1f} % of the forward; NumPy {np_rate:7.0f} tok/s "
              f"(prompt {np_pre:6.0f}); qkv/NumPy {dec_rate / np_rate:5.2f}x")

    stamp = time.strftime("%Y-%m-%d")
    lines = [BEGIN, "<!-- Generated by bench/generate.py --write-doc: edit the script, not this "
             "section. -->", "",
             f"### Generation, stories260K, greedy, {a.steps} positions, {a.threads} threads "
             f"({stamp})", "",
             f"{cpu_name()}; median of {a.reps} runs each, alternating; numpy {np.__version__}. "
             f"Greedy ids of all {len(PROMPTS)} prompts identical between the two.", "",
             "| batch | tokens | qkv tok/s | of which attention | the rest | qkv prompt tok/s "
             "| NumPy tok/s | NumPy prompt tok/s | qkv / NumPy |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['B']} | {r['tok']} | {r['qkv']:.0f} | {100 * r['att']:.0f} % | "
                     f"{100 * (1 - r['att']):.0f} % | {r['qkv_pre']:.0f} | {r['np']:.0f} | "
                     f"{r['np_pre']:.0f} | {r['qkv'] / r['np']:.2f}x |")
    lines += ["", "tok/s: generated tokens over the wall time of the decode phase (sampling and "
              "the loop included); attention: the share of the forward's thread-time spent in "
              "the KV-cache appends and qkv's attention calls.", END]
    section = "\n".join(lines)
    print(section)
    if a.write_doc:
        write_section(DOC, section, BEGIN, END)
    for name in os.listdir(tmp):
        os.unlink(os.path.join(tmp, name))
    os.rmdir(tmp)


if __name__ == "__main__":
    main()
