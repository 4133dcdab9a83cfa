"""The ``backbone`` stage's code: load the configured backbone once and save it as a plain Hugging Face folder.

``backbone``: the offline embedded SmolLM2 GGUF (``embedded``), a hub id or a local folder →
``save_pretrained`` with its tokenizer to ``models/backbone`` (written into a temporary sibling and renamed,
ordinary permissions), so every later stage loads a plain folder.

:func:`resolve_backbone` is what every stage uses to turn a configured name into what ``load_backbone``
gets: a name that looks like a local path and does not exist is an :class:`InputError` at once, never a
hub request (which would retry over the network for a minute before failing with a misleading message).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from pipeline.params import register_section


class InputError(ValueError):
    """A problem with the stage's inputs (params, data, paths): reported in one line, exit status 2."""


class BackboneParams(BaseModel):
    """``backbone``: what to load and where to save it."""

    model_config = ConfigDict(extra="forbid")

    name_or_path: str = "embedded"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    out_dir: str = "models/backbone"
    trust_remote_code: bool = False


register_section("backbone", BackboneParams)


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def ordinary_permissions(path: Path) -> None:
    """Give ``path`` (a file or a tree) the permissions of a plain write under the umask (mkdtemp gives 0700,
    and files written into it stay readable to their owner only where the writer used mkstemp)."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def looks_local(name: str, root: Path, local_names: tuple[str, ...] = ()) -> bool:
    """Whether ``name`` is meant as a path: absolute, ``./``/``../``/``~``, more than one ``/``, a first
    component that exists under ``root``, or one of ``local_names`` (e.g. the backbone stage's out_dir).
    A hub id is ``name`` or ``org/name``."""
    if name in local_names or name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1:
        return True
    return "/" in name and (root / name.split("/", 1)[0]).exists()


def resolve_backbone(name: str, root: Path, field: str, local_names: tuple[str, ...] = ()) -> str:
    """``name`` as ``load_backbone`` should get it: ``embedded``, an existing folder (absolute), or a hub id.

    Raises :class:`InputError` naming ``field`` when ``name`` looks like a local path that does not exist.
    """
    from deltamem.backbones.embedded import EMBEDDED_NAMES

    if name in EMBEDDED_NAMES:
        return name
    path = Path(name).expanduser()
    path = path if path.is_absolute() else root / path
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{field}: {path} is a file; expected a Hugging Face model folder")
        return str(path)
    if looks_local(name, root, local_names):
        raise InputError(
            f"{field}: {path} does not exist (expected a Hugging Face model folder; "
            "the backbone stage writes models/backbone, or give a hub id such as Qwen/Qwen3-8B)"
        )
    return name


def prepare_backbone(p: BackboneParams, root: Path) -> Path:
    """Save the backbone + tokenizer as a plain Hugging Face folder (atomically, ordinary permissions)."""
    from deltamem.backbones import load_backbone

    name = resolve_backbone(p.name_or_path, root, "backbone.name_or_path")
    model, tok = load_backbone(name, dtype=torch_dtype(p.dtype), trust_remote_code=p.trust_remote_code)
    if getattr(model, "hf_quantizer", None) is not None:  # GGUF is de-quantised on load: plain weights now
        model.hf_quantizer = None
        model.config.quantization_config = None
    out = root / p.out_dir
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "deltamem_backbone.json").write_text(json.dumps(p.model_dump(), indent=2))
        ordinary_permissions(tmp)  # mkdtemp makes it 0700
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
