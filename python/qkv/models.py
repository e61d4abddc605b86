"""Pretrained models on qkv's attention: qkv.Model("folder") loads a
config.json + model.safetensors folder ("bert" sentence embeddings such as
all-MiniLM-L6-v2, "vit" MNIST digits, "sasrec" recommendations, "llama"
text generation) or a llama2.c checkpoint file ("llama")."""
import ctypes

import numpy as np

from . import _lib

P = ctypes.POINTER
_SIGS = {
    "qkv_model_load": ([ctypes.c_void_p, ctypes.c_char_p, P(ctypes.c_void_p)], ctypes.c_int),
    "qkv_model_free": ([ctypes.c_void_p], None),
    "qkv_model_type": ([ctypes.c_void_p], ctypes.c_char_p),
    "qkv_model_dim": ([ctypes.c_void_p], ctypes.c_int64),
    "qkv_model_max_tokens": ([ctypes.c_void_p], ctypes.c_int64),
    "qkv_model_image_pixels": ([ctypes.c_void_p], ctypes.c_int64),
    "qkv_model_tokenize": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p,
                            P(ctypes.c_int32), ctypes.c_int64, P(ctypes.c_int64)],
                           ctypes.c_int),
    "qkv_model_embed": ([ctypes.c_void_p, ctypes.c_void_p, P(ctypes.c_char_p), ctypes.c_int64,
                         P(ctypes.c_float)], ctypes.c_int),
    "qkv_model_classify": ([ctypes.c_void_p, ctypes.c_void_p, P(ctypes.c_uint8),
                            ctypes.c_int64, P(ctypes.c_float)], ctypes.c_int),
    "qkv_model_recommend": ([ctypes.c_void_p, ctypes.c_void_p, P(ctypes.c_int32),
                             ctypes.c_int64, ctypes.c_int64, P(ctypes.c_int32),
                             P(ctypes.c_float)], ctypes.c_int),
}




class GenOpts(ctypes.Structure):
    _fields_ = [("max_seqs", ctypes.c_int64), ("max_positions", ctypes.c_int64),
                ("block_size", ctypes.c_int64), ("kv_dtype", ctypes.c_int)]


class SamplerOpts(ctypes.Structure):
    _fields_ = [("temperature", ctypes.c_float), ("top_k", ctypes.c_int64),
                ("top_p", ctypes.c_float), ("seed", ctypes.c_uint64)]


KV_DTYPES = {"f32": 0, "f16": 1, "bf16": 2, "i8": 16}

_SIGS.update({
    "qkv_model_load_llama": ([ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p,
                              P(ctypes.c_void_p)], ctypes.c_int),
    "qkv_model_detokenize": ([ctypes.c_void_p, ctypes.c_void_p, P(ctypes.c_int32),
                              ctypes.c_int64, ctypes.c_char_p, ctypes.c_int64,
                              P(ctypes.c_int64)], ctypes.c_int),
    "qkv_model_piece": ([ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32, P(ctypes.c_int64)],
                        ctypes.c_void_p),
    "qkv_model_is_stop": ([ctypes.c_void_p, ctypes.c_int32], ctypes.c_int),
    "qkv_model_export": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p], ctypes.c_int),
    "qkv_gen_opts_default": ([], GenOpts),
    "qkv_gen_create": ([ctypes.c_void_p, ctypes.c_void_p, P(GenOpts), P(ctypes.c_void_p)],
                       ctypes.c_int),
    "qkv_gen_free": ([ctypes.c_void_p], None),
    "qkv_gen_add": ([ctypes.c_void_p, P(ctypes.c_int32), ctypes.c_int64, P(ctypes.c_int32)],
                    ctypes.c_int),
    "qkv_gen_feed": ([ctypes.c_void_p, ctypes.c_int32, P(ctypes.c_int32), ctypes.c_int64],
                     ctypes.c_int),
    "qkv_gen_step": ([ctypes.c_void_p], ctypes.c_int),
    "qkv_gen_logits": ([ctypes.c_void_p, ctypes.c_int32], P(ctypes.c_float)),
    "qkv_gen_length": ([ctypes.c_void_p, ctypes.c_int32], ctypes.c_int64),
    "qkv_gen_remove": ([ctypes.c_void_p, ctypes.c_int32], ctypes.c_int),
    "qkv_sampler_opts_default": ([], SamplerOpts),
    "qkv_sampler_create": ([ctypes.c_void_p, P(SamplerOpts), P(ctypes.c_void_p)], ctypes.c_int),
    "qkv_sampler_free": ([ctypes.c_void_p], None),
    "qkv_sampler_sample": ([ctypes.c_void_p, ctypes.c_void_p, P(ctypes.c_float), ctypes.c_int64,
                            P(ctypes.c_int32)], ctypes.c_int),
})

_lib.bind(_SIGS)


def _fn(name):
    return getattr(_lib.lib, name)


class Model:
    """A loaded model. Calls release the GIL; one Model may serve several
    Python threads (each uses its own library context)."""

    def __init__(self, path, threads=None, tokenizer=None):
        """path: a model folder, or a llama2.c checkpoint file; tokenizer:
        a llama2.c tokenizer file (llama; default: the one beside)."""
        self.threads = threads
        ptr = ctypes.c_void_p()
        ctx = _lib.context(threads)
        if tokenizer is None:
            st = _fn("qkv_model_load")(ctx, str(path).encode(), ctypes.byref(ptr))
        else:
            st = _fn("qkv_model_load_llama")(ctx, str(path).encode(), str(tokenizer).encode(),
                                             ctypes.byref(ptr))
        _lib.check(st, ctx)
        self._m = ptr.value
        self.type = _fn("qkv_model_type")(self._m).decode()
        self.dim = _fn("qkv_model_dim")(self._m)

    def close(self):
        if getattr(self, "_m", None):
            _fn("qkv_model_free")(self._m)
            self._m = None

    def __del__(self):
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _ctx(self):
        if not self._m:
            raise ValueError("the model is closed")
        return _lib.context(self.threads)

    def tokenize(self, text):
        """bert: the token ids of text ([CLS] ... [SEP], truncated);
        llama: BOS and the BPE ids of the text, however many."""
        ctx = self._ctx()
        raw = text.encode("utf-8", "surrogatepass")
        cap = _fn("qkv_model_max_tokens")(self._m)
        if self.type == "llama":
            cap = len(raw) + 2   # at most one token per byte, BOS, the dummy prefix
        ids = (ctypes.c_int32 * max(cap, 1))()
        n = ctypes.c_int64()
        st = _fn("qkv_model_tokenize")(ctx, self._m, raw, ids, cap, ctypes.byref(n))
        _lib.check(st, ctx)
        return list(ids[:n.value])

    def _detok(self, ids):
        ctx = self._ctx()
        a = np.ascontiguousarray(ids, dtype=np.int32)
        n = ctypes.c_int64()
        pa = a.ctypes.data_as(P(ctypes.c_int32))
        _fn("qkv_model_detokenize")(ctx, self._m, pa, a.size, None, 0, ctypes.byref(n))
        buf = ctypes.create_string_buffer(n.value + 1)
        st = _fn("qkv_model_detokenize")(ctx, self._m, pa, a.size, buf, n.value + 1,
                                         ctypes.byref(n))
        _lib.check(st, ctx)
        return buf.raw[:n.value]

    def detokenize(self, ids):
        """llama: the text of ids (BOS and EOS print nothing; a piece right
        after BOS loses its leading space); bytes that are not UTF-8 are
        replaced."""
        return self._detok(ids).decode("utf-8", "replace")

    def export(self, folder):
        """llama: writes the model as a Hugging Face Llama folder
        (config.json, model.safetensors, tokenizer.bin)."""
        ctx = self._ctx()
        _lib.check(_fn("qkv_model_export")(ctx, self._m, str(folder).encode()), ctx)

    def generate(self, prompts, steps=256, temperature=1.0, top_k=0, top_p=1.0, seed=0,
                 batch=32, kv="f32", return_ids=False):
        """llama: each prompt and its continuation, as `qkv generate` makes
        them: steps positions per text, prompt included (0: the context),
        stopping at BOS or EOS; temperature 0 is greedy; every prompt gets
        its own sampler seeded with seed, and up to `batch` run together
        (continuous batching), each text the same as generated alone. A
        str prompt gives a str, a list a list; return_ids gives the ids
        (BOS, prompt, continuation) instead."""
        single = isinstance(prompts, str)
        prompts = [prompts] if single else list(prompts)
        ctx = self._ctx()
        V = self.dim
        context = _fn("qkv_model_max_tokens")(self._m)
        steps = context if steps <= 0 or steps > context else steps
        ids = [self.tokenize(p) for p in prompts]
        for i, x in enumerate(ids):
            if len(x) > steps:
                raise ValueError(f"prompt {i} is {len(x)} tokens, more than steps = {steps}")
        go = _fn("qkv_gen_opts_default")()
        go.max_seqs = max(1, min(batch, len(prompts)))
        go.kv_dtype = KV_DTYPES[kv]
        so = _fn("qkv_sampler_opts_default")()
        so.temperature, so.top_k, so.top_p, so.seed = temperature, top_k, top_p, seed
        g = ctypes.c_void_p()
        _lib.check(_fn("qkv_gen_create")(ctx, self._m, ctypes.byref(go), ctypes.byref(g)), ctx)
        samplers = []
        try:
            for _ in prompts:
                s = ctypes.c_void_p()
                _lib.check(_fn("qkv_sampler_create")(ctx, ctypes.byref(so), ctypes.byref(s)),
                           ctx)
                samplers.append(s)
            seq = [None] * len(prompts)
            live, nxt = [], 0
            tok = ctypes.c_int32()
            while live or nxt < len(prompts):
                while len(live) < go.max_seqs and nxt < len(prompts):
                    a = (ctypes.c_int32 * len(ids[nxt]))(*ids[nxt])
                    s = ctypes.c_int32()
                    _lib.check(_fn("qkv_gen_add")(g, a, len(ids[nxt]), ctypes.byref(s)), ctx)
                    seq[nxt] = s.value
                    live.append(nxt)
                    nxt += 1
                _lib.check(_fn("qkv_gen_step")(g), ctx)
                for i in list(live):
                    lg = _fn("qkv_gen_logits")(g, seq[i])
                    _lib.check(_fn("qkv_sampler_sample")(ctx, samplers[i], lg, V,
                                                         ctypes.byref(tok)), ctx)
                    done = bool(_fn("qkv_model_is_stop")(self._m, tok.value))
                    if not done:
                        ids[i].append(tok.value)
                        done = _fn("qkv_gen_length")(g, seq[i]) >= steps
                        if not done:
                            _lib.check(_fn("qkv_gen_feed")(g, seq[i], ctypes.byref(tok), 1),
                                       ctx)
                    if done:
                        _fn("qkv_gen_remove")(g, seq[i])
                        live.remove(i)
        finally:
            for s in samplers:
                _fn("qkv_sampler_free")(s)
            _fn("qkv_gen_free")(g)
        if return_ids:
            return ids[0] if single else ids
        texts = []
        for p, x in zip(prompts, ids):
            # the prompt as given, then the bytes of the pieces after it
            head = self._detok(x[:len(self.tokenize(p))])
            texts.append(p + self._detok(x)[len(head):].decode("utf-8", "replace"))
        return texts[0] if single else texts

    def embed(self, texts):
        """bert: unit-length embeddings, float32 [len(texts), dim]."""
        if isinstance(texts, str):
            texts = [texts]
        ctx = self._ctx()
        enc = [t.encode("utf-8", "surrogatepass") for t in texts]
        arr = (ctypes.c_char_p * len(enc))(*enc)
        out = np.empty((len(enc), self.dim), np.float32)
        st = _fn("qkv_model_embed")(ctx, self._m, arr, len(enc),
                                    out.ctypes.data_as(P(ctypes.c_float)))
        _lib.check(st, ctx)
        return out

    def classify(self, pixels):
        """vit: logits float32 [n, classes] of uint8 images [n, pixels]
        (or [n, 28, 28])."""
        ctx = self._ctx()
        px = np.ascontiguousarray(pixels, dtype=np.uint8)
        n = px.shape[0] if px.ndim > 1 else 1
        want = _fn("qkv_model_image_pixels")(self._m)
        if px.size != n * want:
            raise ValueError(f"pixels: {px.size} values for {n} images of {want}")
        out = np.empty((n, self.dim), np.float32)
        st = _fn("qkv_model_classify")(ctx, self._m, px.ctypes.data_as(P(ctypes.c_uint8)), n,
                                       out.ctypes.data_as(P(ctypes.c_float)))
        _lib.check(st, ctx)
        return out

    def recommend(self, history, k=10):
        """sasrec: the k best next items after history (item ids, oldest
        first) and their scores."""
        ctx = self._ctx()
        h = np.ascontiguousarray(history, dtype=np.int32)
        items = np.empty(k, np.int32)
        scores = np.empty(k, np.float32)
        st = _fn("qkv_model_recommend")(ctx, self._m, h.ctypes.data_as(P(ctypes.c_int32)),
                                        h.size, k, items.ctypes.data_as(P(ctypes.c_int32)),
                                        scores.ctypes.data_as(P(ctypes.c_float)))
        _lib.check(st, ctx)
        return items, scores
