"""qkv.Model with a Llama-family model: tokens, text, and generation that
matches `qkv generate`. Skipped without stories260K (../shared/models
beside the repository, or $QKV_MODELS)."""
import os
import subprocess

import pytest

import qkv

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
MODELS = os.environ.get("QKV_MODELS") or os.path.join(ROOT, "..", "shared", "models")
STORIES = os.path.join(MODELS, "stories260K", "stories260K.bin")
QKV = os.path.join(ROOT, "build", "qkv")


@pytest.fixture(scope="module")
def model():
    if not os.path.exists(STORIES):
        pytest.skip(f"{STORIES} not found")
    with qkv.Model(STORIES) as m:
        yield m


def test_tokens_and_text(model):
    assert model.type == "llama" and model.dim == 512
    assert model.tokenize("Once upon a time") == [1, 403, 407, 261, 378]
    ids = model.tokenize("caf\u00e9 \u4e2d\u6587 \U0001F600 " * 100)   # past 512 tokens too
    assert len(ids) > 512
    assert model.detokenize(ids) == "caf\u00e9 \u4e2d\u6587 \U0001F600 " * 100
    assert model.detokenize([1, 2]) == ""
    with pytest.raises(qkv.Error, match="ids\\[1\\]"):
        model.detokenize([1, 600])


def test_generate(model):
    text = model.generate("Once upon a time", steps=60, temperature=0)
    assert text.startswith("Once upon a time, there was a little girl named Lily.")
    ids = model.generate("Once upon a time", steps=60, temperature=0, return_ids=True)
    assert len(ids) == 61 and ids[:5] == [1, 403, 407, 261, 378]
    # batched, sampled: each text equals the text generated alone
    prompts = ["Once upon a time", "The dog", "Lily and Tom went to the park"]
    together = model.generate(prompts, steps=80, temperature=0.9, top_p=0.9, seed=3, batch=2)
    alone = [model.generate(p, steps=80, temperature=0.9, top_p=0.9, seed=3) for p in prompts]
    assert together == alone
    with pytest.raises(ValueError):
        model.generate("Once upon a time", steps=3)


def test_generate_matches_cli(model):
    if not os.path.exists(QKV):
        pytest.skip(f"{QKV} not built")
    out = subprocess.run([QKV, "generate", "-m", STORIES, "-p", "Tom and", "-n", "100",
                          "-t", "0.8", "-s", "11"], capture_output=True, check=True)
    text = model.generate("Tom and", steps=100, temperature=0.8, top_p=0.9, seed=11)
    assert out.stdout.decode("utf-8", "replace") == text + "\n"


def test_export(model, tmp_path):
    model.export(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors", "tokenizer.bin"]
    with qkv.Model(tmp_path) as hf:
        assert hf.type == "llama"
        assert (hf.generate("The cat", steps=50, temperature=0) ==
                model.generate("The cat", steps=50, temperature=0))
