"""Atomic outputs, JSON normalisation and file hashing.

Every output is written to a temporary sibling and renamed into place, so a killed job never leaves a
half-written file under the final name and Snakemake and resumable steps can trust an existing output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from wsicore.errors import InputError

_UMASK = os.umask(0)
os.umask(_UMASK)


def check_replaceable(final: str | os.PathLike, marker: str | None) -> None:
    """Refuse an output directory path that names something other than an empty folder or one holding
    `marker` (what was written there before): a mistyped output path must not delete a user's folder."""
    final = Path(final)
    if not final.exists() and not final.is_symlink():
        return
    if final.is_dir() and not final.is_symlink() and (
            (marker is not None and (final / marker).is_file()) or not any(final.iterdir())):
        return
    kind = f"a folder holding {marker}" if marker else "an empty folder"
    raise InputError(f"{final}: exists and is not {kind}; refusing to replace it, which would delete what it holds. "
                     "Pass a new output path, or remove it yourself first")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, is_dir: bool = False, replaces: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `final`; on success rename it to `final`.

    Works for files and directories (Zarr stores, model directories). On error the temporary path is
    removed and `final` is left untouched. An existing directory is replaced only when it is empty or holds
    the file `replaces` (see `check_replaceable`).
    """
    final = Path(final)
    if is_dir:
        check_replaceable(final, replaces)
    output_folder(final.parent, what=f"folder for {final.name}")
    prefix = f".{final.name}.tmp-"
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
        os.chmod(tmp, 0o777 & ~_UMASK)
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=final.suffix, dir=final.parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs should be as readable as any file
    try:
        yield tmp
        if is_dir and final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Write JSON atomically (key order is kept: it is part of readability)."""
    write_text(path, json.dumps(jsonable(obj), indent=indent) + "\n")


def jsonable(value: Any) -> Any:
    """`value` as plain JSON types: numpy scalars/arrays, bytes, paths, tuples and dataclasses converted."""
    import dataclasses

    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    tolist = getattr(value, "tolist", None)  # numpy arrays and scalars, torch tensors
    if callable(tolist):
        return jsonable(tolist())
    return str(value)


def sha256_file(path: str | os.PathLike, block: int = 1 << 24) -> str:
    """Hex sha256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def _where(flag: str | None) -> str:
    return f" (option {flag})" if flag else ""


def _a(what: str) -> str:
    return ("an " if what[:1].lower() in "aeiou" else "a ") + what


def input_file(path: str | os.PathLike, what: str = "file", flag: str | None = None) -> Path:
    """`path` when it names an existing file; else an InputError naming it, what it should be and the flag."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} not found: {p}{_where(flag)}")
    if p.is_dir():
        raise InputError(f"{p}: is a folder; expected {_a(what)}{_where(flag)}")
    return p


def output_folder(path: str | os.PathLike, flag: str | None = None, what: str = "output folder") -> Path:
    """`path` as an existing folder, made with its parents if needed; a file in the way or a folder that cannot
    be made is an InputError naming it and the flag, not a traceback."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"{p}: is a file; expected {_a(what)}{_where(flag)}")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a parent folder should be, no permission, read-only file system
        raise InputError(f"{p}: cannot make {_a(what)} here ({exc.strerror or exc}){_where(flag)}; "
                         f"pass a folder you can write") from exc
    return p


def read_json(path: str | os.PathLike, what: str = "JSON file", flag: str | None = None) -> Any:
    """The parsed content of a user's JSON file; a missing, unreadable or malformed file is an InputError
    that names it (and the position of the first error)."""
    p = input_file(path, what, flag)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{p}: cannot be read as {_a(what)} ({exc}){_where(flag)}") from exc
    if not text.strip():
        raise InputError(f"{p}: the file is empty; expected {_a(what)}{_where(flag)}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{p}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); expected "
                         f"{_a(what)}{_where(flag)}") from exc
