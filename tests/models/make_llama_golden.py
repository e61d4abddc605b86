#!/usr/bin/env python3
"""Golden tokens, greedy generations and logits of stories260K for the tests
of `qkv generate`.

Everything is rebuilt from shared/models/stories260K/README.md, in three
parts that check one another:

- a tokenizer written from the README's algorithm (llama2.c's encode: BOS,
  the dummy-prefix space, code points or byte fallback id = byte + 3, then
  best-score adjacent merges, earliest pair on ties, BOS taking part in the
  scan) and its decoder (the piece after BOS loses its leading space,
  <0xHH> is the raw byte, the bytes are decoded as UTF-8 with
  errors='replace');
- a float64 numpy forward pass written from the README (interleaved RoPE
  pairs, grouped-query attention, SwiGLU, tied classifier);
- Hugging Face transformers' LlamaForCausalLM built from the same weights,
  with wq and wk permuted per head (rows [0,2,4,6,1,3,5,7]: llama2.c
  rotates the pairs (2i, 2i+1), transformers the halves (i, i+4)), run in
  float64. transformers computes three things in float32 even after
  model.double(): the RMSNorm (it upcasts to float32), the RoPE angles,
  cos and sin, and the eager softmax. The script replaces the first two
  with float64 versions and uses the "sdpa" attention, so the whole model
  runs in float64; then its logits agree with the numpy pass to ~1e-12.

The greedy generations come from the transformers model (one token at a
time through its KV cache), with llama2.c's -n rule: the model runs at
positions 0 .. steps-1 (prompt tokens, BOS included, are fed first), the
token chosen from the logits at position steps-1 is appended but never
fed, and generation stops, without appending, when the chosen token is
BOS (1). The numpy pass then recomputes every logit of each sequence and
must choose the same tokens. Written to tests/models/llama_golden.json:

  model, made_by, stop_rule,
  tokenizer: [{text, ids, decoded}],
  generate:  [{prompt, steps, ids (BOS, prompt ids, generated ids), text
               (the decoded ids, as llama2.c prints them), min_margin,
               logits: [{pos, values: 512 float64 numpy logits after
               feeding ids[0..pos]}], margins, stop, eos_in_ids}]

margins[i] is the gap between the two largest float64 logits at position
n_prompt-1+i, the position whose logits choose the i-th token after the
prompt (the last one may be the BOS that stops); min_margin is their
minimum.

To rerun (CPU only, some seconds):

    python3 -m venv /tmp/goldenv
    /tmp/goldenv/bin/pip install numpy==2.4.6 torch==2.15.0 \\
        transformers==5.25.0 safetensors==0.8.0
    /tmp/goldenv/bin/python tests/models/make_llama_golden.py \\
        [--models DIR] [--out FILE]

When this file was made, karpathy/llama2.c's run.c (commit 350e04f, float32,
greedy) gave the same ids for every tokenizer text and every generation,
and its logits differed from the float64 ones here by at most 1.9e-5.

DIR holds stories260K/stories260K.bin and stories260K/tok512.bin; it
defaults to $QKV_MODELS, else ../../../shared/models from this file.
FILE defaults to llama_golden.json next to this file.
"""
import argparse
import inspect
import json
import os
import platform
import re
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

BOS, EOS = 1, 2
HEADER = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")

LONG = ("Once upon a time, there was a little girl named Lily. She loved to play "
        "outside in the park with her friends. One day, she saw a big, red ball "
        "under a tree. \"Can I play with it?\" she asked her mom. Her mom smiled "
        "and said, \"Yes, but be careful!\" Lily kicked the ball very high, and it "
        "flew over the fence. Tom, her friend, ran to get it. They laughed and "
        "played until the sun went down. At the end of the day, Lily was tired "
        "but happy. She hugged her mom and said, \"Thank you for a fun day.\"")

TOKENIZER_TEXTS = [
    "Once upon a time",
    "",
    "a",
    " ",
    "  ",
    "Lily",
    "Hello, world!",
    "Lily and Tom were best friends.",
    "The cat sat on the mat.",
    "hello world",
    "HELLO WORLD",
    "The the THE tHe",
    "It's a dog's life; isn't it?",
    "Tom said, \"Let's play!\"",
    "1234567890",
    "3.14159 and 2024-01-01 and 100%",
    "a  b   c    d",
    "  leading spaces",
    "trailing spaces   ",
    "   both   ",
    "line one\nline two",
    "\n",
    "\n\nparagraph\n\n",
    "a\tb\t\tc",
    "\tindented",
    "windows\r\nline",
    "Café",
    "naïve résumé jalapeño",
    "Ångström ÉCOLE Straße",
    "ÿ and \u0080 and \u00a0 (nbsp)",
    "e\u0301 (combining acute)",
    "中文",
    "日本語のテキスト",
    "한국어",
    "Привет, мир",
    "αβγ",
    "مرحبا",
    "नमस्ते",
    "😀",
    "I \u2764\ufe0f cats 🐱",
    "👍🏽",
    "☕",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "Café ☕ time",
    "<s>",
    "</s>",
    "a <s> b </s> c",
    "\n<s>\n",
    "<unk>",
    "<0x41>",
    "!?.,;:'\"()[]{}<>-_=+*&^%$#@~`|\\/",
    "=",
    "#hashtag @user",
    "x = y + 1; // comment",
    "\u201cHi,\u201d she said \u2014 it\u2019s\u2026 fine \u2013 ok \u2018yes\u2019",
    "\u20ac100 \u2122 a\u200ab",
    "\x01\x7f control",
    "supercalifragilisticexpialidocious",
    "aaaaaaaaaaaaaaaa",
    "hehehe ththth llll ssss",
    "One day, a little girl named Lily went to the park.",
    "Timmy and his mom",
    LONG,
]

PROMPTS = [
    ("Once upon a time", 256),
    ("Lily and Tom", 256),
    ("The cat sat", 256),
    ("One day, a little girl named", 256),
    ("Dragons", 256),
    ("Café ☕ time", 256),
    ("", 256),
    ("Tim", 512),
    ("Once upon a time", 8),
]


# ---- files ------------------------------------------------------------------

def load_checkpoint(path):
    """llama2.c version-0 checkpoint -> (config dict, float64 weight dict)."""
    raw = open(path, "rb").read()
    cfg = dict(zip(HEADER, np.frombuffer(raw[:28], dtype="<i4").tolist()))
    shared = cfg["vocab_size"] > 0
    cfg["vocab_size"] = abs(cfg["vocab_size"])
    D, F, L = cfg["dim"], cfg["hidden_dim"], cfg["n_layers"]
    V, S, H = cfg["vocab_size"], cfg["seq_len"], cfg["n_heads"]
    hs = D // H
    KV = cfg["n_kv_heads"] * hs
    shapes = [("token_embedding", (V, D)), ("rms_att", (L, D)), ("wq", (L, D, D)),
              ("wk", (L, KV, D)), ("wv", (L, KV, D)), ("wo", (L, D, D)),
              ("rms_ffn", (L, D)), ("w1", (L, F, D)), ("w2", (L, D, F)),
              ("w3", (L, F, D)), ("rms_final", (D,)),
              ("freq_cis_real", (S * hs // 2,)), ("freq_cis_imag", (S * hs // 2,))]
    if not shared:
        shapes.append(("wcls", (V, D)))
    n = sum(int(np.prod(s)) for _, s in shapes)
    if len(raw) != 28 + 4 * n:
        sys.exit(f"{path}: {len(raw)} bytes, the header implies {28 + 4 * n}")
    flat = np.frombuffer(raw, dtype="<f4", offset=28)
    w, off = {}, 0
    for name, shape in shapes:
        size = int(np.prod(shape))
        w[name] = flat[off:off + size].reshape(shape).astype(np.float64)
        off += size
    if shared:
        w["wcls"] = w["token_embedding"]
    return cfg, w


def load_tokenizer(path, vocab_size):
    raw = open(path, "rb").read()
    max_len = int(np.frombuffer(raw[:4], dtype="<i4")[0])
    pieces, scores, off = [], [], 4
    for _ in range(vocab_size):
        score = float(np.frombuffer(raw[off:off + 4], dtype="<f4")[0])
        n = int(np.frombuffer(raw[off + 4:off + 8], dtype="<i4")[0])
        off += 8
        pieces.append(raw[off:off + n])
        scores.append(score)
        off += n
    if off != len(raw):
        sys.exit(f"{path}: {len(raw)} bytes, {vocab_size} tokens end at {off}")
    if max(map(len, pieces)) > max_len:
        sys.exit(f"{path}: a piece is longer than max_token_length {max_len}")
    return Tokenizer(pieces, scores)


# ---- tokenizer ----------------------------------------------------------------

BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")


class Tokenizer:
    def __init__(self, pieces, scores):
        self.pieces, self.scores = pieces, scores
        self.ids = {p: i for i, p in enumerate(pieces)}
        assert len(self.ids) == len(pieces), "duplicate token texts"
        assert pieces[BOS] == b"\n<s>\n" and pieces[EOS] == b"\n</s>\n"
        assert all(pieces[b + 3] == b"<0x%02X>" % b for b in range(256))

    def encode(self, text):
        ids = [BOS]
        if text:
            ids.append(self.ids[b" "])             # the dummy prefix
        for ch in text:
            b = ch.encode("utf-8")
            if b in self.ids:
                ids.append(self.ids[b])
            else:
                ids.extend(x + 3 for x in b)        # byte fallback
        while True:
            best, best_i = None, -1
            for i in range(len(ids) - 1):
                j = self.ids.get(self.pieces[ids[i]] + self.pieces[ids[i + 1]])
                if j is not None and (best is None or self.scores[j] > self.scores[best]):
                    best, best_i = j, i             # strict >: the earliest pair wins ties
            if best is None:
                return ids
            ids[best_i:best_i + 2] = [best]

    def piece_bytes(self, prev, tok):
        p = self.pieces[tok]
        if prev == BOS and p.startswith(b" "):
            p = p[1:]
        m = BYTE_PIECE.fullmatch(p)
        return bytes([int(m.group(1), 16)]) if m else p

    def decode(self, ids):
        """The text llama2.c prints for ids[1:] (ids[0] is BOS)."""
        out = b"".join(self.piece_bytes(a, b) for a, b in zip(ids, ids[1:]))
        return out.decode("utf-8", errors="replace")


# ---- numpy float64 forward ---------------------------------------------------

def rmsnorm(x, g):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5) * g


def forward_np(cfg, w, ids):
    """float64 logits [len(ids), vocab]: row p is after feeding ids[0..p]."""
    T, D, H, KVH = len(ids), cfg["dim"], cfg["n_heads"], cfg["n_kv_heads"]
    hs = D // H
    pos = np.arange(T, dtype=np.float64)
    freq = 10000.0 ** (-(2.0 * np.arange(hs // 2)) / hs)
    ang = pos[:, None] * freq[None, :]                  # [T, hs/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rope(t, nh):                                    # pairs (2i, 2i+1) of each head
        t = t.reshape(T, nh, hs // 2, 2)
        u, v = t[..., 0], t[..., 1]
        return np.stack([u * cos - v * sin, u * sin + v * cos], axis=-1).reshape(T, nh, hs)

    causal = np.triu(np.ones((T, T), dtype=bool), 1)
    x = w["token_embedding"][ids]
    for l in range(cfg["n_layers"]):
        h = rmsnorm(x, w["rms_att"][l])
        q = rope(h @ w["wq"][l].T, H)
        k = rope(h @ w["wk"][l].T, KVH)
        v = (h @ w["wv"][l].T).reshape(T, KVH, hs)
        att = np.empty((T, H, hs))
        for hd in range(H):
            kv = hd // (H // KVH)
            s = q[:, hd] @ k[:, kv].T / np.sqrt(hs)
            s[causal] = -np.inf
            p = np.exp(s - s.max(axis=1, keepdims=True))
            att[:, hd] = (p / p.sum(axis=1, keepdims=True)) @ v[:, kv]
        x = x + att.reshape(T, D) @ w["wo"][l].T
        h = rmsnorm(x, w["rms_ffn"][l])
        g = h @ w["w1"][l].T
        x = x + ((g / (1.0 + np.exp(-g))) * (h @ w["w3"][l].T)) @ w["w2"][l].T
    return rmsnorm(x, w["rms_final"]) @ w["wcls"].T


# ---- transformers ----------------------------------------------------------------

def permute_rows(m, n_heads):
    """llama2.c's interleaved RoPE rows -> transformers' split halves, per head."""
    rows, cols = m.shape
    return m.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def build_hf(cfg, w, float64_internals=True):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama as ml

    hs = cfg["dim"] // cfg["n_heads"]
    hc = LlamaConfig(hidden_size=cfg["dim"], intermediate_size=cfg["hidden_dim"],
                     num_hidden_layers=cfg["n_layers"], num_attention_heads=cfg["n_heads"],
                     num_key_value_heads=cfg["n_kv_heads"], head_dim=hs,
                     vocab_size=cfg["vocab_size"], max_position_embeddings=cfg["seq_len"],
                     rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                     attention_bias=False, mlp_bias=False, hidden_act="silu",
                     bos_token_id=BOS, eos_token_id=EOS)
    rp = getattr(hc, "rope_parameters", None) or {}
    assert rp.get("rope_theta", getattr(hc, "rope_theta", None)) == 10000.0
    model = LlamaForCausalLM._from_config(
        hc, attn_implementation="sdpa" if float64_internals else "eager")
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    sd = {"model.embed_tokens.weight": t(w["token_embedding"]),
          "model.norm.weight": t(w["rms_final"]),
          "lm_head.weight": t(w["wcls"])}
    for l in range(cfg["n_layers"]):
        p = f"model.layers.{l}."
        sd[p + "input_layernorm.weight"] = t(w["rms_att"][l])
        sd[p + "post_attention_layernorm.weight"] = t(w["rms_ffn"][l])
        sd[p + "self_attn.q_proj.weight"] = t(permute_rows(w["wq"][l], cfg["n_heads"]))
        sd[p + "self_attn.k_proj.weight"] = t(permute_rows(w["wk"][l], cfg["n_kv_heads"]))
        sd[p + "self_attn.v_proj.weight"] = t(w["wv"][l])
        sd[p + "self_attn.o_proj.weight"] = t(w["wo"][l])
        sd[p + "mlp.gate_proj.weight"] = t(w["w1"][l])
        sd[p + "mlp.up_proj.weight"] = t(w["w3"][l])
        sd[p + "mlp.down_proj.weight"] = t(w["w2"][l])
    model = model.double()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if k != "lm_head.weight"], (missing, unexpected)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    model.eval()

    if float64_internals:
        def rms64(self, x):
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)
                                                  + self.variance_epsilon))

        inv = 1.0 / (10000.0 ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs))

        def rope64(self, x, position_ids):
            f = position_ids[..., None].to(torch.float64) * inv
            e = torch.cat((f, f), dim=-1)
            return e.cos().to(x.dtype), e.sin().to(x.dtype)

        for mod in model.modules():
            if isinstance(mod, ml.LlamaRMSNorm):
                mod.forward = rms64.__get__(mod)
            elif isinstance(mod, ml.LlamaRotaryEmbedding):
                mod.forward = rope64.__get__(mod)
    return model


def hf_logits(model, ids):
    import torch
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=False)
    return out.logits[0].numpy()


def hf_generate(model, prompt_ids, steps, seq_len):
    """llama2.c's loop; one token at a time through the KV cache."""
    import torch
    from transformers import DynamicCache

    steps = seq_len if steps <= 0 or steps > seq_len else steps
    ids, logits, pos, stop = list(prompt_ids), [], 0, "steps"
    # transformers 5 calls the cache argument `cache`, 4.x `past_key_values`
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = {kw: DynamicCache()}
    token = ids[0]
    with torch.no_grad():
        while pos < steps:
            out = model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[pos]]),
                        use_cache=True, **cache)
            row = out.logits[0, -1].numpy().copy()
            logits.append(row)
            nxt = prompt_ids[pos + 1] if pos < len(prompt_ids) - 1 else int(np.argmax(row))
            pos += 1
            if nxt == BOS:
                stop = "bos"
                break
            if pos >= len(prompt_ids):
                ids.append(nxt)
            token = nxt
    return ids, np.array(logits), stop


# ---- main ------------------------------------------------------------------------

def margin(row):
    top = np.sort(row)[-2:]
    return float(top[1] - top[0])


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=os.environ.get("QKV_MODELS") or
                    os.path.join(here, "..", "..", "..", "shared", "models"))
    ap.add_argument("--out", default=os.path.join(here, "llama_golden.json"))
    args = ap.parse_args()

    import torch
    import transformers
    torch.set_num_threads(2)

    mdir = os.path.join(args.models, "stories260K")
    cfg, w = load_checkpoint(os.path.join(mdir, "stories260K.bin"))
    assert (cfg["dim"], cfg["hidden_dim"], cfg["n_layers"], cfg["n_heads"], cfg["n_kv_heads"],
            cfg["vocab_size"], cfg["seq_len"]) == (64, 172, 5, 8, 4, 512, 512), cfg
    tok = load_tokenizer(os.path.join(mdir, "tok512.bin"), cfg["vocab_size"])
    assert tok.encode("Once upon a time") == [1, 403, 407, 261, 378]
    assert tok.ids[b" "] == 410

    tokenizer = []
    for text in TOKENIZER_TEXTS:
        ids = tok.encode(text)
        dec = tok.decode(ids)
        assert dec == text, (text, ids, dec)
        tokenizer.append({"text": text, "ids": ids, "decoded": dec})

    model = build_hf(cfg, w)
    plain = build_hf(cfg, w, float64_internals=False)
    worst_inc = worst_full = worst_plain = 0.0
    generate = []
    for prompt, steps in PROMPTS:
        pids = tok.encode(prompt)
        ids, inc, stop = hf_generate(model, pids, steps, cfg["seq_len"])
        fed = len(inc)                                   # positions 0 .. fed-1 ran
        ref = forward_np(cfg, w, ids[:fed])
        full = hf_logits(model, ids[:fed])
        worst_inc = max(worst_inc, float(np.abs(inc - ref).max()))
        worst_full = max(worst_full, float(np.abs(full - ref).max()))
        worst_plain = max(worst_plain, float(np.abs(hf_logits(plain, ids[:fed]) - ref).max()))
        n = len(pids)
        chosen = ids[n:] + ([BOS] if stop == "bos" else [])
        assert [int(np.argmax(r)) for r in ref[n - 1:]] == chosen, prompt
        margins = [margin(r) for r in ref[n - 1:]]
        text = tok.decode(ids)
        assert text.startswith(prompt), (prompt, text)
        show = sorted({p for p in (n - 1, n, n + 9, fed - 1) if p < fed})
        generate.append({
            "prompt": prompt, "steps": steps, "ids": ids, "text": text,
            "min_margin": min(margins),
            "logits": [{"pos": p, "values": [float(v) for v in ref[p]]} for p in show],
            "margins": margins, "stop": stop, "eos_in_ids": EOS in ids[1:]})
        print(f"{prompt!r} steps {steps}: {len(ids)} ids, stop {stop}, "
              f"min margin {min(margins):.6g} at +{int(np.argmin(margins))}, "
              f"EOS {'yes' if EOS in ids[1:] else 'no'}")
    print(f"max |transformers - numpy| logits: incremental {worst_inc:.3g}, "
          f"full sequence {worst_full:.3g}; stock float32 internals {worst_plain:.3g}")
    assert worst_inc < 1e-9 and worst_full < 1e-9

    out = {
        "model": "stories260K (shared/models/stories260K: stories260K.bin, tok512.bin)",
        "made_by": (
            "tests/models/make_llama_golden.py with Python %s, numpy %s, torch %s (CPU), "
            "transformers %s. Greedy ids from transformers' LlamaForCausalLM in float64 "
            "(wq/wk rows permuted per head to split-half RoPE; RMSNorm and RoPE replaced "
            "by float64 versions, sdpa attention; transformers otherwise computes them in "
            "float32), one token at a time through its KV cache. Logits, margins and a "
            "re-check of every greedy choice from an independent float64 numpy forward "
            "pass written from the README; max |transformers - numpy| over all logits: "
            "%.3g (KV cache), %.3g (whole sequence); %.3g with transformers' stock float32 "
            "RMSNorm/RoPE/softmax. Tokenizer ids and texts from an independent Python "
            "encoder/decoder written from the README (llama2.c's algorithm). "
            "decoded/text: the pieces after BOS (the one right after BOS without its "
            "leading space, <0xHH> as the raw byte), decoded as UTF-8 with "
            "errors='replace' (llama2.c's safe_printf would instead drop lone bytes that "
            "are neither printable nor space). margins[i]: top-1 minus top-2 float64 "
            "logit at position len(prompt ids)-1+i; min_margin their minimum."
            % (platform.python_version(), np.__version__, torch.__version__,
               transformers.__version__, worst_inc, worst_full, worst_plain)),
        "stop_rule": (
            "llama2.c's: encode(prompt) gives [BOS] + prompt ids ([BOS] alone for the "
            "empty prompt); steps larger than seq_len (or 0) means seq_len; the model "
            "runs at positions 0..steps-1, prompt tokens fed first; from the last prompt "
            "position on, the next token is argmax of the logits (lowest id on ties); if "
            "it is BOS (1) generation stops and BOS is not appended (stop: \"bos\"), "
            "otherwise it is appended. The token chosen at position steps-1 is appended "
            "but never fed, so without a BOS stop len(ids) == steps + 1 (stop: "
            "\"steps\"). EOS (2) does not stop generation; eos_in_ids says whether it "
            "appears."),
        "tokenizer": tokenizer,
        "generate": generate,
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=True, indent=None, separators=(",", ":"))
        f.write("\n")
    print(f"{args.out}: {len(tokenizer)} tokenizer texts, {len(generate)} generations, "
          f"{os.path.getsize(args.out)} bytes")


if __name__ == "__main__":
    main()
