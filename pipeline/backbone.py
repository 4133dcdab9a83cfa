"""The ``backbone`` stage's code: load the configured backbone once and save it as a plain Hugging Face folder.

``backbone``: the offline embedded SmolLM2 GGUF (``embedded``), a hub id or a local folder →
``save_pretrained`` with its tokenizer to ``models/backbone`` (written into a temporary sibling and renamed,
ordinary permissions), so every later stage loads a plain folder.

:func:`resolve_backbone` is what the stages use to check a configured name before any work starts (before
torchrun ranks or Ray workers each fail on it): :func:`deltamem.backbones.resolve_source` decides, and a
name that looks like a local path and does not exist, or a hub id the hub cannot serve, is an
:class:`InputError` at once, never a minute of network retries ending in a misleading message.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.common import atomic_dir, torch_dtype
from pipeline.params import BackboneParams


class InputError(ValueError):
    """A problem with the stage's inputs (params, data, paths): reported in one line, exit status 2."""


__all__ = ["BackboneParams", "InputError", "check_backbone_folder", "prepare_backbone", "resolve_backbone"]


def resolve_backbone(name: str, root: Path, field: str, local_names: tuple[str, ...] = ()) -> str:
    """``name`` as ``load_backbone`` should get it: ``embedded``, an existing folder (absolute), or a hub id.

    Raises :class:`InputError` naming ``field`` when ``name`` cannot be loaded (see
    :func:`deltamem.backbones.resolve_source`); ``local_names`` always count as local paths (the backbone
    stage's ``out_dir``: ``models/backbone`` has the form of a hub id).
    """
    from deltamem.backbones import EMBEDDED_NAMES, BackboneLoadError, resolve_source

    if name in EMBEDDED_NAMES:
        return name
    if name in local_names and not (root / name).exists():
        raise InputError(f"{field}: {root / name} does not exist (run the backbone stage, which writes it)")
    try:
        return resolve_source(name, root, field).path
    except BackboneLoadError as err:
        raise InputError(str(err)) from None


def check_backbone_folder(folder: Path, field: str) -> None:
    """A local model folder's files are readable before any process loads them: ``config.json`` and the
    tokenizer's JSON files parse, every safetensors header is intact (a truncated file fails here). Raises
    :class:`InputError` naming the file (so torchrun ranks or Ray actors never each fail on it)."""
    from safetensors import safe_open

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        f = folder / name
        if name != "config.json" and not f.exists():
            continue
        try:
            json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise InputError(f"{field}: {f}: unreadable ({type(err).__name__}: {err})") from None
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        except Exception as err:  # SafetensorError, OSError
            raise InputError(f"{field}: {f}: unreadable safetensors file ({err})") from None


def prepare_backbone(p: BackboneParams, root: Path) -> Path:
    """Save the backbone + tokenizer as a plain Hugging Face folder (atomically, ordinary permissions)."""
    from deltamem.backbones import load_backbone

    name = resolve_backbone(p.name_or_path, root, "backbone.name_or_path")
    model, tok = load_backbone(
        name,
        dtype=torch_dtype(p.dtype),
        attn_implementation=p.attn_implementation,
        root=root,
        what="backbone.name_or_path",
        trust_remote_code=p.trust_remote_code,
    )
    if getattr(model, "hf_quantizer", None) is not None:  # GGUF is de-quantised on load: plain weights now
        model.hf_quantizer = None
        model.config.quantization_config = None
    out = root / p.out_dir
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "deltamem_backbone.json").write_text(json.dumps(p.model_dump(), indent=2))
    return out
