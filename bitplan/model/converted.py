"""A ``.gguf`` converted once: the bf16 Hugging Face folder in the cache that later commands
read instead of dequantizing the file again (minutes for a few hundred million weights).

The folder is keyed by the file's content, not its path: a file replaced under the same name
is converted anew, and a copy elsewhere finds the same folder. Bundled models keep their own
folders (``bundled.py``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from bitplan.cache import cache_dir

_CHUNK = 16 << 20
#: The provenance note of a model read from a converted .gguf.
CONVERTED_NOTE = "weights dequantized from a GGUF (cached as bf16)"


def file_fingerprint(path: Path) -> str:
    """A short hex digest of the file's bytes (BLAKE2b; about a second per GB)."""
    digest = hashlib.blake2b(digest_size=12)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def converted_folder(gguf_path: Path) -> Path:
    """The cached bf16 folder of ``gguf_path``, converted now if it is not there yet."""
    from bitplan.model.loading import convert_gguf_to_folder

    folder = cache_dir() / "models" / f"{gguf_path.stem}-{file_fingerprint(gguf_path)}-bf16"
    if not (folder / "config.json").is_file():
        print(f"converting {gguf_path.name} once into {folder} ...", flush=True)
        convert_gguf_to_folder(gguf_path, folder)
    return folder
