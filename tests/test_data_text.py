"""Calibration and held-out text: sources, packing, errors, fingerprints, disjointness."""

from __future__ import annotations

import json

import pytest
import torch

from bitplan.data.calibration import calibration_samples, default_calibration_texts, fingerprint
from bitplan.data.heldout import heldout_samples, heldout_texts
from bitplan.data.text import drop_overlapping, pack_tokens, read_texts, word_ngrams
from bitplan.errors import BitplanError


def test_default_calibration_is_deterministic(tiny_tokenizer):
    a = calibration_samples(tiny_tokenizer, n_samples=3, seq_len=40)
    b = calibration_samples(tiny_tokenizer, n_samples=3, seq_len=40)
    assert a.shape == (3, 40) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert fingerprint() == fingerprint()
    assert len(fingerprint()) == 16


def test_packing_separates_documents_with_eos(tiny_tokenizer):
    samples = pack_tokens(["ab", "cd", "ef"] * 10, tiny_tokenizer, n_samples=2, seq_len=5)
    eos = tiny_tokenizer.eos_token_id
    ids = tiny_tokenizer(["ab"], add_special_tokens=False)["input_ids"][0]
    assert samples.flatten()[: len(ids) + 1].tolist() == [*ids, eos]


class _BosTokenizer:
    """A tokenizer that starts every text with BOS (id 1), as Gemma's and Llama-3's do."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, texts, add_special_tokens=True):
        many = [texts] if isinstance(texts, str) else texts
        ids = [[1] * add_special_tokens + [10 + ord(c) for c in text] for text in many]
        return {"input_ids": ids[0] if isinstance(texts, str) else ids}


def test_windows_start_with_bos_when_the_tokenizer_adds_one(tiny_tokenizer):
    samples = pack_tokens(["abcdef"] * 10, _BosTokenizer(), n_samples=3, seq_len=5)
    assert samples.shape == (3, 5)
    assert samples[:, 0].tolist() == [1, 1, 1]
    assert 1 not in samples[:, 1:].flatten().tolist()  # the stream itself holds no BOS
    assert samples[0, 1:].tolist() == [10 + ord(c) for c in "abcd"]
    # A tokenizer that adds none (SmolLM2's, the tiny one) gets plain windows.
    plain = pack_tokens(["ab", "cd"] * 10, tiny_tokenizer, n_samples=2, seq_len=5)
    assert plain[0, 0] != getattr(tiny_tokenizer, "bos_token_id", None)


def test_user_sources_txt_jsonl_arrow(tmp_path, tiny_tokenizer):
    import datasets

    text = "The quick brown fox jumps over the lazy dog. " * 20
    txt = tmp_path / "calib.txt"
    txt.write_text(text)
    jsonl = tmp_path / "calib.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": text, "id": i}) for i in range(3)) + "\n")
    folder = tmp_path / "arrow"
    datasets.Dataset.from_dict({"passage": [text] * 3, "label": [0, 1, 0]}).save_to_disk(folder)

    assert read_texts(txt) == [text]
    assert read_texts(jsonl) == [text] * 3
    assert read_texts(folder) == [text] * 3  # the only string column is used
    for source in (txt, jsonl, folder):
        samples = calibration_samples(tiny_tokenizer, n_samples=2, seq_len=16, source=source)
        assert samples.shape == (2, 16)
    assert fingerprint(txt) != fingerprint(jsonl) != fingerprint()


def test_missing_source_and_too_few_tokens_are_clear_errors(tmp_path, tiny_tokenizer):
    with pytest.raises(BitplanError, match="does not exist"):
        calibration_samples(tiny_tokenizer, source=tmp_path / "nope.jsonl")
    small = tmp_path / "small.txt"
    small.write_text("A model is quantized.")
    with pytest.raises(BitplanError, match=r"gives only \d+ tokens.*need 2,048"):
        calibration_samples(tiny_tokenizer, n_samples=2, seq_len=1024, source=small)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "x"}\n')
    with pytest.raises(BitplanError, match="line 1: no string field 'text'"):
        calibration_samples(tiny_tokenizer, source=bad)


def test_heldout_text_is_disjoint_from_calibration(tiny_tokenizer):
    heldout, calibration = heldout_texts(), default_calibration_texts()
    assert len(heldout) > 400 and len(calibration) > 2000
    assert drop_overlapping(heldout, calibration) == heldout
    assert not set(heldout) & set(calibration)
    samples = heldout_samples(tiny_tokenizer, n_samples=2, seq_len=32)
    assert samples.shape == (2, 32)


def test_drop_overlapping_uses_13_word_sequences():
    base = "one two three four five six seven eight nine ten eleven twelve thirteen"
    assert len(word_ngrams(base)) == 1
    assert drop_overlapping(["x " + base.upper() + " y", "one two three"], [base]) == [
        "one two three"
    ]
