"""Hugging Face Hub ids (``Qwen/Qwen3-8B``) as model sources, read from the local hub cache.

Every tool of the field takes a hub id and the Hugging Face cache; so does bitplan. The id
resolves through ``huggingface_hub.snapshot_download``: the cached snapshot when there is one
(always, with ``HF_HUB_OFFLINE=1``), else a download where the Hub is reachable.
"""

from __future__ import annotations

import re
from pathlib import Path

from bitplan.errors import BitplanError

# owner/name, as the Hub spells repository ids (no path separators beyond the one slash).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
#: What a model needs from its repository: configs, weights, tokenizer files.
_MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def looks_like_hub_id(source: str) -> bool:
    """``owner/name`` that is not a path on this machine."""
    return bool(_HUB_ID.fullmatch(source)) and not Path(source).expanduser().exists()


def hub_model(repo_id: str) -> tuple[Path, str, str]:
    """The snapshot folder of ``repo_id``, the model's short name and a provenance note."""
    return hub_folder(repo_id), repo_id.split("/")[1], f"hub: {repo_id}"


def hub_folder(repo_id: str) -> Path:
    """The local snapshot folder of the Hub model ``repo_id`` (see the module doc)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_MODEL_FILES))
    except LocalEntryNotFoundError:
        offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub is unreachable"
        raise BitplanError(
            f"no folder {repo_id} here, and the Hub model {repo_id} is not in the Hugging Face "
            f"cache ({constants.HF_HUB_CACHE}) while {offline}: download it where the Hub is "
            f"reachable (hf download {repo_id}), or give a folder"
        ) from None
    except HfHubHTTPError as error:  # unknown or gated repository, and the like
        raise BitplanError(f"cannot get {repo_id} from the Hugging Face Hub: {error}") from None
