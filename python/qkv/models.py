"""Pretrained models on qkv's attention: qkv.Model("folder") loads a
config.json + model.safetensors folder ("bert" sentence embeddings such as
all-MiniLM-L6-v2, "vit" MNIST digits, "sasrec" recommendations)."""
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


_lib.bind(_SIGS)


def _fn(name):
    return getattr(_lib.lib, name)


class Model:
    """A loaded model. Calls release the GIL; one Model may serve several
    Python threads (each uses its own library context)."""

    def __init__(self, path, threads=None):
        self.threads = threads
        ptr = ctypes.c_void_p()
        ctx = _lib.context(threads)
        st = _fn("qkv_model_load")(ctx, str(path).encode(), ctypes.byref(ptr))
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
        """bert: the token ids of text ([CLS] ... [SEP], truncated)."""
        ctx = self._ctx()
        cap = _fn("qkv_model_max_tokens")(self._m)
        ids = (ctypes.c_int32 * max(cap, 1))()
        n = ctypes.c_int64()
        st = _fn("qkv_model_tokenize")(ctx, self._m, text.encode("utf-8", "surrogatepass"),
                                       ids, cap, ctypes.byref(n))
        _lib.check(st, ctx)
        return list(ids[:n.value])

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
