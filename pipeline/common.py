"""Helpers every stage shares: atomic writes, JSON without NaN, dtype names, the pad id.

Atomic writes have one behaviour everywhere: the content goes into a temporary *sibling* (same folder, so
the rename never crosses a file system; hidden name ``.<name>.*.tmp``), is flushed and ``fsync``-ed, gets
the permissions of a plain write under the umask (``mkstemp``/``mkdtemp`` create 0600/0700), and is
renamed over the target with ``os.replace``. A reader sees the old file or the new one, never half of
one; a failure (a full disk, a kill) leaves the old file and removes the temporary one.

The bootstrap lives in :mod:`pipeline.stats` (one computation for the evaluator and the report).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TextIO

DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
DtypeName = Literal["float32", "bfloat16", "float16"]


def torch_dtype(name: str) -> Any:
    """The ``torch.dtype`` of one of :data:`DTYPES`."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def check_dtype(name: str) -> str:
    """``name`` when it is one of :data:`DTYPES`, else ``ValueError`` listing them (pydantic validators)."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}; allowed: {', '.join(DTYPES)}")
    return name


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id (SmolLM2/Llama tokenizers often define no pad token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ordinary_permissions(path: Path) -> None:
    """Give ``path`` (a file or a tree) the permissions of a plain write under the umask."""
    mask = _umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _atomic_write(path: Path, write: Callable[[TextIO], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_lines(path: Path, lines: Iterable[str]) -> None:
    """``path`` ← ``lines`` (each followed by ``\\n``), UTF-8, atomically (see the module docstring)."""

    def write(f: TextIO) -> None:
        for line in lines:
            f.write(line)
            f.write("\n")

    _atomic_write(path, write)


def atomic_write_text(path: Path, text: str) -> None:
    """``path`` ← ``text`` (UTF-8, ``\\n`` line ends) atomically."""
    _atomic_write(path, lambda f: f.write(text))


def json_safe(obj: Any) -> Any:
    """NaN/±inf → None, recursively (JSON and ``dvc metrics`` cannot read them)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: Path, data: Any, *, sort_keys: bool = False) -> None:
    """``path`` ← ``data`` as indented JSON (NaN/inf as null, a final newline) atomically."""
    atomic_write_text(path, json.dumps(json_safe(data), indent=2, sort_keys=sort_keys) + "\n")


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Build a folder in a temporary sibling (yielded) that replaces ``final`` when the block succeeds.

    The tree gets ordinary permissions and its files are fsync-ed; then ``final`` (if any) is renamed
    aside, the new tree renamed into place and the old one removed. On an exception (in the block or in
    the renames) the previous ``final`` is back in place and no temporary sibling is left.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    old = final.with_name(f"{tmp.name[: -len('.tmp')]}.old")
    try:
        yield tmp
        ordinary_permissions(tmp)
        for p in tmp.rglob("*"):
            if p.is_file():
                with p.open("rb") as f:
                    os.fsync(f.fileno())
        if final.exists():
            final.rename(old)
        tmp.rename(final)
    except BaseException:
        if old.exists() and not final.exists():
            old.rename(final)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
