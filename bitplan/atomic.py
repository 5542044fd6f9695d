"""Writing files and folders atomically: everything is written under a hidden temporary name next
to the destination and renamed into place only once complete. A failure or an interrupt
(KeyboardInterrupt included) removes the temporary, so no half-written file is ever left.

* ``atomic_file(path)`` / ``atomic_folder(path)``: context managers yielding the temporary path
  to write into (exports: a .gguf file, a model folder);
* ``write_json_atomic(path, data)``: plans, scores, results and cache files;
* ``check_output_file`` / ``check_output_dir``: refuse an existing output unless ``force``, to be
  called before long work so that the user learns at once.

A process killed outright (SIGKILL, power loss) cannot clean up: its temporaries are removed by
the next write to the same destination. Each writer holds a lock on its temporary while writing,
so a temporary that is still in use is never taken for a stale one. Files and folders get the
user's usual permissions (umask), not the private ones temporaries are created with.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bitplan.errors import BitplanError


def check_output_dir(out: str | os.PathLike, force: bool = False) -> Path:
    """Refuse an existing ``out`` unless ``force``, or one that cannot be created; call it before
    long work so that the user learns at once. Returns ``out`` as a Path."""
    out = _refuse_existing_dir(out, force)
    _check_can_create(out)
    return out


def check_output_file(out: str | os.PathLike, force: bool = False) -> Path:
    """Like ``check_output_dir`` for an output that is one file (a .gguf)."""
    out = _refuse_existing_file(out, force)
    _check_can_create(out)
    return out


def _refuse_existing_dir(out: str | os.PathLike, force: bool) -> Path:
    out = Path(out).expanduser()
    if out.is_symlink():  # replacing it would replace the link, not what it points to
        raise BitplanError(f"{out} is a symbolic link; give a real path, or another output path")
    if out.is_file():
        raise BitplanError(f"{out} exists and is not a folder; choose another output path")
    if out.exists() and not force:
        raise BitplanError(f"{out} exists; pass --force to replace it")
    return out


def _refuse_existing_file(out: str | os.PathLike, force: bool) -> Path:
    out = Path(out).expanduser()
    if out.is_dir():
        raise BitplanError(f"{out} is a folder; give a file name")
    if out.exists() and not force:
        raise BitplanError(f"{out} exists; pass --force to replace it")
    return out


def _check_can_create(out: Path) -> None:
    """Refuse an output that cannot be created, before long work: the nearest folder that
    exists on its path must accept a new file (probed with an empty file, removed at once)."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise BitplanError(f"cannot write {out}: {parent} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".bitplan-probe-")
    except OSError as err:
        raise BitplanError(f"cannot write {out}: {err.strerror} in {parent}") from None
    os.close(fd)
    os.unlink(probe)


@contextmanager
def atomic_file(path: str | os.PathLike, force: bool = True) -> Iterator[Path]:
    """Yield a temporary file next to ``path``; on success it replaces ``path``.

    An existing ``path`` is refused unless ``force`` (the default, for files that are meant to
    be rewritten: plans, caches). The file gets the user's usual permissions (umask).
    """
    path = _refuse_existing_file(path, force)
    fd, tmp = _create_temporary(path, tempfile.mkstemp)
    fcntl.flock(fd, fcntl.LOCK_EX)  # "in use": remove_stale_temporaries leaves it alone
    try:
        yield Path(tmp)
        os.chmod(tmp, user_mode(directory=False))  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


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
    out = _refuse_existing_dir(out, force)
    tmp = Path(_create_temporary(out, tempfile.mkdtemp))
    fd = os.open(tmp, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield tmp
        # mkdtemp (and some writers) make things private; an export is an ordinary folder.
        for path in tmp.rglob("*"):
            path.chmod(user_mode(directory=path.is_dir()))
        tmp.chmod(user_mode(directory=True))
        _move_into_place(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(fd)


_TMP, _OLD = ".tmp-", ".old-"  # the temporaries' infixes: .NAME.tmp-XXXX, .NAME.old-XXXX


def _create_temporary(out: Path, make: Callable) -> Any:
    """``make`` (``mkstemp`` or ``mkdtemp``) a temporary beside ``out``, after removing stale
    ones; an output that cannot be created is a one-line error (creating it is the probe)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        return make(dir=out.parent, prefix=f".{out.name}{_TMP}")
    except OSError as err:
        raise BitplanError(f"cannot write {out}: {err.strerror} in {out.parent}") from None


def user_mode(directory: bool) -> int:
    """The mode a new file or folder gets from the user's umask (read without changing it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporaries an earlier, killed run left next to ``path`` (``.NAME.tmp-*``,
    ``.NAME.old-*``). A temporary still being written is locked by its writer and kept."""
    path = Path(path)
    removed = []
    for stale in (
        *path.parent.glob(f".{path.name}{_TMP}*"),
        *path.parent.glob(f".{path.name}{_OLD}*"),
    ):
        try:
            fd = os.open(stale, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # another process is writing it
        finally:
            os.close(fd)
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    if not out.exists():
        tmp.rename(out)
        return
    if not force:  # appeared while we were writing
        raise BitplanError(f"{out} exists; pass --force to replace it")
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}{_OLD}"))
    old.rmdir()
    out.rename(old)
    fd = os.open(old, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # until deleted: not a stale temporary for anyone else
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)  # put the previous export back
        raise
    finally:
        os.close(fd)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def file_lock(path: Path, enabled: bool = True, waiting: str = "") -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` body; ``waiting``
    is printed once if another process holds it. The lock ends with the process, even a killed
    one, so it never needs cleaning up."""
    if not enabled:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, user_mode(directory=False))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if waiting:
                print(f"bitplan: {waiting}", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
