"""Reading and writing JSON files. The atomic writer lives in :mod:`bitplan.atomic` with the
other atomic writers, and is named here too because plans, scores and benchmarks import it from
here."""

from __future__ import annotations

import json
import os
from pathlib import Path

from bitplan.atomic import write_json_atomic
from bitplan.errors import BitplanError

__all__ = ["read_json_object", "write_json_atomic"]


def read_json_object(path: str | os.PathLike, what: str) -> dict:
    """The JSON object in ``path``, or a one-line BitplanError saying it is not ``what`` (for a
    file that is not UTF-8, not JSON, or JSON of another shape)."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BitplanError(f"{path} is not {what} (not valid JSON: {err})") from err
    if not isinstance(data, dict):
        kind = "null" if data is None else "array" if isinstance(data, list) else "value"
        raise BitplanError(f"{path} is not {what} (a JSON {kind}, not an object)")
    return data
