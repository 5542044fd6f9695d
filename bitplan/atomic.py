"""Writing files and folders atomically: everything is written under a hidden temporary name next
to the destination and renamed into place only once complete. A failure or an interrupt
(KeyboardInterrupt included) removes the temporary, so no half-written file is ever left.

* ``atomic_file(path)`` / ``atomic_folder(path)``: context managers yielding the temporary path
  to write into (exports: a .gguf file, a model folder);
* ``write_json_atomic(path, data)``: plans, scores, results and cache files;
* ``check_output_file`` / ``check_output_dir``: refuse an existing output unless ``force``, to be
  called before long work so that the user learns at once.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bitplan.errors import BitplanError


def check_output_dir(out: str | os.PathLike, force: bool = False) -> Path:
    """Refuse an existing ``out`` unless ``force``; call it before long work so that the user
    learns at once. Returns ``out`` as a Path."""
    out = Path(out).expanduser()
    if out.is_symlink() or out.is_file():
        raise BitplanError(f"{out} exists and is not a folder; choose another output path")
    if out.exists() and not force:
        raise BitplanError(f"{out} exists; pass --force to replace it")
    return out


def check_output_file(out: str | os.PathLike, force: bool = False) -> Path:
    """Like ``check_output_dir`` for an output that is one file (a .gguf)."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise BitplanError(f"{out} is a folder; give a file name")
    if out.exists() and not force:
        raise BitplanError(f"{out} exists; pass --force to replace it")
    return out


@contextmanager
def atomic_file(path: str | os.PathLike, force: bool = True) -> Iterator[Path]:
    """Yield a temporary file next to ``path``; on success it replaces ``path``.

    An existing ``path`` is refused unless ``force`` (the default, for files that are meant to
    be rewritten: plans, caches). The temporary is private (mode 0600), as ``mkstemp`` makes it.
    """
    path = check_output_file(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, data: object) -> None:
    """Write ``data`` as indented JSON to ``path``; a failure leaves no partial file."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")


@contextmanager
def atomic_folder(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder to write into; on success it becomes ``out``.

    With ``force`` an existing ``out`` is moved aside, the new folder renamed in, and the old
    one deleted, so that ``out`` is only ever missing for the instant between two renames.
    """
    out = check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        # mkdtemp (and some writers) make things private; an export is an ordinary folder.
        for path in tmp.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        tmp.chmod(0o755)
        _move_into_place(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    if not out.exists():
        tmp.rename(out)
        return
    if not force:  # appeared while we were writing
        raise BitplanError(f"{out} exists; pass --force to replace it")
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    old.rmdir()
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)  # put the previous export back
        raise
    shutil.rmtree(old, ignore_errors=True)
