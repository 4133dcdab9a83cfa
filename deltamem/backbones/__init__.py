"""Which Hugging Face decoders δ-mem can attach to, and how to find their attention modules.

Every supported family keeps its attention in ``<decoder>.layers[i].self_attn`` with separate
``q_proj``/``k_proj``/``v_proj``/``o_proj`` linear layers, which is all the hooks in
:mod:`deltamem.attach` need: corrections are added to those projections' outputs, so the backbone's
own attention code (eager, SDPA, flash-attention, KV caching, Qwen3's q/k norms, SmolLM3's NoPE layers)
runs untouched. A family with fused QKV projections (e.g. Phi-3) would need its own entry here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from .embedded import EMBEDDED_NAMES, load_embedded
from .loading import (
    ATTN_IMPLEMENTATIONS,
    BackboneLoadError,
    ModelSource,
    check_attn_implementation,
    one_line,
    resolve_attn_implementation,
    resolve_source,
)

# model_type → human name; all share the layout described above.
SUPPORTED_MODEL_TYPES = {
    "llama": "Llama / SmolLM2",
    "qwen3": "Qwen3",
    "smollm3": "SmolLM3",
    "mistral": "Mistral",
    "qwen2": "Qwen2 / Qwen2.5",
}

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "EMBEDDED_NAMES",
    "SUPPORTED_MODEL_TYPES",
    "BackboneLoadError",
    "ModelSource",
    "check_attn_implementation",
    "find_attention_layers",
    "load_backbone",
    "load_embedded",
    "load_tokenizer",
    "resolve_attn_implementation",
    "resolve_source",
]


def _decoder(model: nn.Module) -> nn.Module:
    for cand in (getattr(model, "model", None), model):
        if cand is not None and isinstance(getattr(cand, "layers", None), nn.ModuleList):
            return cand
    raise ValueError(f"{type(model).__name__}: no decoder with a `layers` ModuleList found")


def find_attention_layers(model: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """Return (decoder module, [attention module of each decoder layer]) or raise a clear error."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_MODEL_TYPES.items())
        raise ValueError(f"δ-mem does not support model_type={model_type!r}; supported: {supported}")
    decoder = _decoder(model)
    attns = []
    for i, layer in enumerate(decoder.layers):
        attn = getattr(layer, "self_attn", None)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not isinstance(getattr(attn, name, None), nn.Linear):
                raise ValueError(f"{model_type}: layer {i} has no self_attn.{name} linear layer")
        attns.append(attn)
    return decoder, attns


def _stored_dtype(folder: str) -> str | None:
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return (cfg.get("dtype") or cfg.get("torch_dtype")) if isinstance(cfg, dict) else None


def _tokenizer(src: ModelSource, name: str, what: str, gguf_file: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    extra: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    if src.local_files_only:
        extra["local_files_only"] = True
    try:
        return AutoTokenizer.from_pretrained(src.path, trust_remote_code=trust_remote_code, **extra)
    except OSError as err:
        raise BackboneLoadError(f"{what} {name!r}: {one_line(err)}") from None
    except ValueError as err:  # a damaged local folder: e.g. an empty or invalid tokenizer.json
        if not src.local:
            raise
        raise BackboneLoadError(f"{what} {src.path}: unreadable tokenizer files ({one_line(err)})") from None


def load_tokenizer(
    name_or_path: str,
    gguf_file: str | None = None,
    root: str | os.PathLike | None = None,
    what: str = "tokenizer",
    trust_remote_code: bool = False,
):
    """A Hugging Face tokenizer from a local folder or hub id, resolved by :func:`resolve_source`
    (a missing local path or an unreachable hub raises :class:`BackboneLoadError` at once)."""
    src = resolve_source(name_or_path, root, what, cache_files=("tokenizer_config.json", "tokenizer.json"))
    return _tokenizer(src, name_or_path, what, gguf_file, trust_remote_code)


def load_backbone(
    name_or_path: str,
    dtype=None,
    attn_implementation: str | None = "auto",
    root: str | os.PathLike | None = None,
    what: str = "backbone",
    **kwargs,
):
    """(model, tokenizer) for a hub id / local folder, or the offline embedded backbone ("embedded").

    ``attn_implementation``: ``auto`` (default: flash_attention_2 when usable, else sdpa), ``eager``,
    ``sdpa`` or ``flash_attention_2`` (see :func:`resolve_attn_implementation`); the chosen one ends up in
    ``model.config._attn_implementation``. A local-looking path that does not exist, or a hub id while the
    hub is unreachable and the model is not cached, raises :class:`BackboneLoadError` before any download
    (``root``: the folder relative paths are taken against; ``what``: the setting named in messages).
    ``trust_remote_code`` stays off unless passed explicitly.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if name_or_path in EMBEDDED_NAMES:
        dtype = dtype or torch.float32
        return load_embedded(dtype=dtype, attn_implementation=resolve_attn_implementation(attn_implementation, dtype))
    kwargs.setdefault("trust_remote_code", False)
    src = resolve_source(name_or_path, root, what)
    # dtype "auto" loads the stored dtype: read it, so that `auto` never picks FlashAttention for fp32 weights
    attn = resolve_attn_implementation(attn_implementation, dtype or (_stored_dtype(src.path) if src.local else None))
    if src.local_files_only:
        kwargs["local_files_only"] = True
    tok = _tokenizer(src, name_or_path, what, trust_remote_code=kwargs["trust_remote_code"])
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src.path, dtype=dtype or "auto", attn_implementation=attn, **kwargs
        )
    except OSError as err:
        raise BackboneLoadError(f"{what} {name_or_path!r}: {one_line(err)}") from None
    except Exception as err:  # a damaged local folder: config.json a directory, truncated safetensors, ...
        if not src.local or not _damaged_folder_error(err):
            raise
        raise BackboneLoadError(f"{what} {src.path}: not a loadable model folder ({one_line(err)})") from None
    return model.eval(), tok


def _damaged_folder_error(err: BaseException) -> bool:
    """Errors from_pretrained raises for broken files in a local folder (not bugs of ours)."""
    if isinstance(err, ValueError):  # incl. json.JSONDecodeError, "Unrecognized model"
        return True
    return type(err).__name__ == "SafetensorError"
