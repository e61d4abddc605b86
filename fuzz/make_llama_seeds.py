#!/usr/bin/env python3
"""Writes the seed corpora of fuzz_llama2c and fuzz_llama_tok: tiny
llama2.c checkpoints of random weights (shared and separate classifiers,
grouped, multi-query and multi-head attention) and small llama2.c
tokenizers (with and without byte tokens), each prefixed for
fuzz_llama_tok by its vocabulary size as two bytes (V - 3, little-endian).
Run from the repository root: python3 fuzz/make_llama_seeds.py"""
import os
import random
import struct

random.seed(7)


def checkpoint(dim, hidden, layers, heads, kv, vocab, seq, shared):
    hs = dim // heads
    kvd = kv * hs
    n = (vocab * dim + layers * dim + 2 * layers * dim * dim + 2 * layers * kvd * dim +
         layers * dim + 3 * layers * hidden * dim + dim + seq * hs +
         (0 if shared else vocab * dim))
    head = struct.pack("<7i", dim, hidden, layers, heads, kv, vocab if shared else -vocab, seq)
    return head + struct.pack("<%df" % n, *[random.uniform(-0.5, 0.5) for _ in range(n)])


def tokenizer(pieces):
    out = [struct.pack("<i", max(len(p) for p in pieces))]
    for i, p in enumerate(pieces):
        out.append(struct.pack("<fi", -float(i), len(p)) + p)
    return b"".join(out)


def write(folder, name, data):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


ck = "fuzz/corpus/llama2c"
write(ck, "gqa.bin", checkpoint(8, 8, 1, 2, 1, 4, 4, True))
write(ck, "separate.bin", checkpoint(8, 6, 1, 2, 2, 5, 3, False))
write(ck, "mqa.bin", checkpoint(8, 4, 2, 4, 1, 3, 2, True))

special = [b"<unk>", b"\n<s>\n", b"\n</s>\n"]
small = special + [b" ", b"a", b"b", b"ab", b" a", b"ba", b"\xc3\xa9", b"caf"]
with_bytes = (special + [b"<0x%02X>" % i for i in range(256)] +
              [b" ", b"a", b"b", b"c", b"ab", b"bc", b" a", b"abc", b" Once", b"Once",
               b"on", b"ce"])
tk = "fuzz/corpus/llama_tok"
for name, pieces in (("small.bin", small), ("bytes.bin", with_bytes)):
    write(tk, name, struct.pack("<H", len(pieces) - 3) + tokenizer(pieces))
