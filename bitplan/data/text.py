"""Plain text in, fixed-length token samples out: reading text sources, packing, fingerprints."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from bitplan.errors import BitplanError

#: Columns tried, in order, when an arrow dataset has no ``text`` column.
TEXT_COLUMNS = ("text", "content", "passage", "story", "document", "article")


_JSONL = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")


def check_text_source(source: str | Path) -> Path:
    """``source`` as a path, refused at once if it is missing or of a kind ``read_texts`` cannot
    read (without reading it: a cheap check before long work)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise BitplanError(f"text source {path} does not exist")
    name = path.name.lower()
    if not (path.is_dir() or name.endswith((".arrow", ".txt", *_JSONL)) or "." not in name):
        raise BitplanError(
            f"cannot read text from {path}: expected a .txt file, a .jsonl file with a "
            "'text' field, a .arrow file, or a folder saved with datasets' save_to_disk"
        )
    return path


def read_texts(source: str | Path, column: str | None = None) -> list[str]:
    """Documents from a user-supplied source, in file order; empty documents are dropped.

    ``source`` is a ``.txt`` file (the whole file is one document), a ``.jsonl`` or ``.jsonl.gz``
    file (one JSON object per line, the document in field ``column``, default ``text``), a
    ``.arrow`` file, or a folder written by ``datasets``' ``save_to_disk`` (the ``column``
    column; by default ``text`` or another usual text column).
    """
    path = check_text_source(source)
    name = path.name.lower()
    try:
        if path.is_dir() or name.endswith(".arrow"):
            texts = _read_arrow(path, column)
        elif name.endswith(_JSONL):
            texts = _read_jsonl(path, column or "text")
        else:
            texts = [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError as err:
        raise BitplanError(
            f"{path} is not UTF-8 text (byte {err.start} cannot be decoded); save it as UTF-8"
        ) from err
    except (gzip.BadGzipFile, EOFError) as err:
        raise BitplanError(f"{path} is not a complete gzip file: {err}") from err
    return [t for t in texts if t and t.strip()]


def _read_jsonl(path: Path, field: str) -> list[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    texts = []
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BitplanError(f"{path}, line {number}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise BitplanError(f"{path}, line {number}: no string field {field!r}")
            texts.append(row[field])
    return texts


def _read_arrow(path: Path, column: str | None) -> list[str]:
    import datasets

    try:
        if path.is_file():
            data = datasets.Dataset.from_file(str(path))
        else:
            data = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise BitplanError(f"{path} is not a dataset saved with datasets' save_to_disk: {e}") from e
    if isinstance(data, datasets.DatasetDict):
        if len(data) == 1 or "train" in data:
            data = data["train"] if "train" in data else next(iter(data.values()))
        else:
            raise BitplanError(
                f"{path} holds several splits ({', '.join(data)}); pass the folder of one split"
            )
    strings = [name for name, f in data.features.items() if getattr(f, "dtype", None) == "string"]
    if column is None:
        column = next((c for c in TEXT_COLUMNS if c in strings), None)
        if column is None and len(strings) == 1:
            column = strings[0]
    if column not in strings:
        raise BitplanError(
            f"{path}: no text column {'to choose' if column is None else repr(column)}; "
            f"its string columns are: {', '.join(strings) or 'none'}"
        )
    return list(data[column])


def unique(texts: Iterable[str]) -> list[str]:
    """Texts with exact duplicates removed, first occurrence kept."""
    return list(dict.fromkeys(texts))


def word_ngrams(text: str, n: int = 13) -> set[int]:
    """Hashes of the lower-cased word n-grams of ``text`` (13 words is the usual length for
    contamination checks); hashes rather than tuples keep large sets small in memory."""
    words = re.findall(r"\w+", text.lower())
    return {hash(tuple(words[i : i + n])) for i in range(len(words) - n + 1)}


def drop_overlapping(texts: Sequence[str], exclude: Sequence[str], n: int = 13) -> list[str]:
    """``texts`` without those that share any word ``n``-gram with a text of ``exclude``."""
    seen: set[int] = set()
    for text in exclude:
        seen |= word_ngrams(text, n)
    return [t for t in texts if seen.isdisjoint(word_ngrams(t, n))]


def text_fingerprint(texts: Iterable[str]) -> str:
    """A short stable hash of the documents and their order (16 hex digits)."""
    digest = hashlib.sha256(b"bitplan-text-v1")
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:16]


def pack_tokens(
    texts: Iterable[str],
    tokenizer: Any,
    n_samples: int,
    seq_len: int,
    what: str = "text",
) -> torch.Tensor:
    """Concatenate the tokenized documents, each followed by EOS, and cut the stream into
    ``n_samples`` consecutive windows of ``seq_len`` tokens: a LongTensor ``[n_samples, seq_len]``.

    A window starts with the BOS token when the tokenizer puts one at the start of every text
    (Gemma, Llama-3): such models are trained so and misbehave without it (Gemma-3-270M: held-out
    perplexity 44.8 without, 18.2 with; docs/RESULTS.md); the window is then BOS and
    ``seq_len - 1`` tokens of the stream. Documents are tokenized only until enough tokens are
    collected. ``what`` names the source in the error raised when it is too short.
    """
    if n_samples < 1 or seq_len < 2:
        raise BitplanError(f"need n_samples >= 1 and seq_len >= 2, got {n_samples} and {seq_len}")
    bos = leading_bos(tokenizer)
    body = seq_len - (bos is not None)
    needed = n_samples * body
    eos = getattr(tokenizer, "eos_token_id", None)
    # Without an EOS token, documents are simply concatenated.
    separator = [] if eos is None else [int(eos)]
    stream: list[int] = []
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == 64:
            stream += _encode(tokenizer, batch, separator)
            batch = []
            if len(stream) >= needed:
                break
    if batch and len(stream) < needed:
        stream += _encode(tokenizer, batch, separator)
    if len(stream) < needed:
        raise BitplanError(
            f"{what} gives only {len(stream):,} tokens with this tokenizer, but {n_samples} samples "
            f"of {seq_len} tokens need {needed:,}; ask for fewer or shorter samples, or give more "
            "text"
        )
    windows = torch.tensor(stream[:needed], dtype=torch.long).view(n_samples, body)
    if bos is None:
        return windows
    return torch.cat([torch.full((n_samples, 1), bos, dtype=torch.long), windows], dim=1)


def leading_bos(tokenizer: Any) -> int | None:
    """The BOS token id if the tokenizer starts every text with it, else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return int(bos) if ids and ids[0] == bos else None


def _encode(tokenizer: Any, texts: list[str], separator: list[int]) -> list[int]:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [token for doc in ids for token in (*doc, *separator)]
