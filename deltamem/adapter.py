"""Adapter files: only the δ-mem parameters, never the backbone.

Ours: a directory with ``deltamem_adapter.json`` ({"format": "deltamem-adapter", "config": DeltaMemConfig,
"backbone": fingerprint, "chat": ChatSettings, ...}) and ``adapter.safetensors`` (tensors
``layers.<i>.<param>``, fp32). The name is not a Hugging Face model file's: a model folder's
``config.json`` and ours cannot be confused. Directories written before the rename (``config.json`` with
``"format": "deltamem-adapter"``) still load. A training output folder holding ``adapter/`` (e.g.
``models/TSW``) may be given instead of the adapter directory itself.

Upstream (``declare-lab/delta-Mem``): ``delta_mem_config.json`` + ``delta_mem_adapter.pt``, a dict of raw
tensors ``<attention module path>.<param>``. It is read with ``torch.load(weights_only=True)``: a file that
needs code execution to load is refused with an error naming it. ``save_adapter(..., format="upstream")``
writes that layout (plus ``deltamem_export.json``, which the reference code ignores and which lets a
round trip ours → upstream → ours restore exactly the same config, settings and weights).

What identifies an adapter (:func:`adapter_digest`, what evaluation hashes) is its weights and its identity
metadata (format, δ-mem config, backbone shape/weight statistics, chat settings); no timings or run facts
are written into the adapter directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .attach import attach_delta_mem, backbone_fingerprint
from .chat import ChatSettings
from .config import DeltaMemConfig

FORMAT = "deltamem-adapter"
META_FILE, WEIGHTS_FILE = "deltamem_adapter.json", "adapter.safetensors"
LEGACY_META_FILE = "config.json"  # the name used before deltamem_adapter.json; still read
CONFIG_FILE = META_FILE  # kept for callers of the old constant
UPSTREAM_CONFIG, UPSTREAM_WEIGHTS = "delta_mem_config.json", "delta_mem_adapter.pt"
EXPORT_FILE = "deltamem_export.json"
_SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "q_out", "kv_out", "o_in")
_IDENTITY_KEYS = ("format", "config", "backbone", "chat")


def _replace_dir(tmp: Path, path: Path) -> None:
    """Move the finished ``tmp`` directory to ``path``, replacing an adapter directory already there."""
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def _identity(meta: dict[str, Any]) -> dict[str, Any]:
    ident = {k: meta[k] for k in _IDENTITY_KEYS if k in meta}
    if isinstance(ident.get("backbone"), dict):  # where the backbone was loaded from is not part of it
        ident["backbone"] = {k: v for k, v in ident["backbone"].items() if k != "name_or_path"}
    return ident


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    extra: dict | None = None,
    *,
    chat: ChatSettings | None = None,
    format: Literal["deltamem", "upstream"] = "deltamem",
) -> Path:
    """Write the adapter directory atomically (temp dir, then rename over ``path``).

    ``chat``: the chat settings the adapter was trained with (default: the library defaults, which is
    what training uses unless told otherwise). ``extra``: more metadata keys, not part of
    :func:`adapter_digest`; do not put timings or other run facts there (any byte in the directory changes
    what DVC sees; training writes its summary beside the adapter). ``format="upstream"``: the reference
    implementation's layout (see the module docstring).
    """
    if format not in ("deltamem", "upstream"):
        raise ValueError(f"save_adapter: format must be 'deltamem' or 'upstream', got {format!r}")
    controller = model.delta_mem
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "config": controller.config.to_dict(),
        "backbone": controller.fingerprint,
        "chat": (chat or ChatSettings()).to_dict(),
        **(extra or {}),
    }
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp"))
    try:
        if format == "upstream":
            _write_upstream(model, tmp, meta)
        else:
            tensors = {n: p.detach().float().contiguous().cpu() for n, p in controller.named_parameters()}
            save_file(tensors, str(tmp / WEIGHTS_FILE))
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        for p in [tmp, *tmp.iterdir()]:  # ordinary permissions (mkdtemp makes 0700)
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        _replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# -- the reference implementation's layout ------------------------------------------------------------
def upstream_config(config: DeltaMemConfig) -> dict[str, Any]:
    """Our config as the reference implementation's ``HFDeltaMemConfig`` fields (inverse of
    :meth:`DeltaMemConfig.from_upstream`)."""
    return {
        "rank": config.rank,
        "alpha": config.alpha,
        "beta_bias_init": config.beta_bias_init,
        "normalize_qk": config.normalize_qk,
        "couple_lambda": config.couple_lambda,
        "state_update_mode": config.state_update_mode,
        "rankwise_gates": config.rankwise_gates,
        "output_init": config.output_init,
        "base_slice_ref_width": config.base_slice_width,
        "online_gain": config.online_gain,
        "num_state_heads": int(config.num_substates or 1),
        "memory_write_granularity": "message_mean" if config.write_mode == "SSW" else "token",
        "target_modules": ["self_attn"],
        "target_layers": [] if config.target_layers is None else list(config.target_layers),
        "delta_heads": list(config.branches),
    }


def _write_upstream(model: nn.Module, folder: Path, meta: dict[str, Any]) -> None:
    controller = model.delta_mem
    names = {id(m): n for n, m in model.named_modules()}
    tensors: dict[str, torch.Tensor] = {}
    for i, layer in controller.layers.items():
        attn = controller.attns[i]
        prefix = names[id(attn)]
        for name, p in layer.named_parameters():
            tensors[f"{prefix}.{name}"] = p.detach().float().cpu().clone()
        for branch in ("q", "k", "v", "o"):  # upstream keeps every branch; inactive ones are zero
            key = f"{prefix}.delta_{branch}_proj"
            if key not in tensors:
                base = getattr(attn, f"{branch}_proj")
                tensors[key] = torch.zeros(base.out_features, controller.config.state_dim)
    torch.save(tensors, folder / UPSTREAM_WEIGHTS)
    (folder / UPSTREAM_CONFIG).write_text(json.dumps(upstream_config(controller.config), indent=2))
    (folder / EXPORT_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


# -- reading ----------------------------------------------------------------------------------------------
def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def resolve_adapter_dir(path: str | os.PathLike) -> Path:
    """``path`` itself, or its ``adapter/`` sub-directory when ``path`` is a training output folder."""
    path = Path(path)
    if not _has_adapter_files(path) and _has_adapter_files(path / "adapter"):
        return path / "adapter"
    return path


def _has_adapter_files(path: Path) -> bool:
    return (path / META_FILE).is_file() or (path / UPSTREAM_CONFIG).is_file() or _legacy(path)


def _legacy(path: Path) -> bool:
    if not (path / LEGACY_META_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        return False
    try:
        return json.loads((path / LEGACY_META_FILE).read_text(encoding="utf-8")).get("format") == FORMAT
    except (ValueError, UnicodeDecodeError, AttributeError):
        return False


def read_adapter_config(path: str | os.PathLike) -> tuple[DeltaMemConfig, dict]:
    """(config, metadata) of an adapter directory in either format."""
    path = resolve_adapter_dir(path)
    meta_file = path / META_FILE if (path / META_FILE).is_file() else path / LEGACY_META_FILE
    if (path / META_FILE).is_file() or _legacy(path):
        meta = _read_json(meta_file)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_file}: field 'format' must be {FORMAT!r}, got {meta.get('format')!r}")
        try:
            return DeltaMemConfig.from_dict(meta["config"]), meta
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{meta_file}: field 'config': {e}") from e
    if (path / UPSTREAM_CONFIG).is_file():
        raw = _read_json(path / UPSTREAM_CONFIG)
        if (path / EXPORT_FILE).is_file():  # written by our exporter: the exact original metadata
            meta = _read_json(path / EXPORT_FILE)
            config = DeltaMemConfig.from_dict(meta["config"])
            if DeltaMemConfig.from_upstream(raw) != DeltaMemConfig.from_dict(
                {**config.to_dict(), "scan_backend": "auto", "chunk_size": 16}
            ):
                raise ValueError(f"{path}: {EXPORT_FILE} does not match {UPSTREAM_CONFIG} (edited by hand?)")
            return config, {**meta, "format": "upstream", "exported": True, "upstream_config": raw}
        try:
            return DeltaMemConfig.from_upstream(raw), {"format": "upstream", "upstream_config": raw}
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path / UPSTREAM_CONFIG}: {e}") from e
    raise FileNotFoundError(
        f"{path}: not a δ-mem adapter (expected {META_FILE} + {WEIGHTS_FILE}, or upstream "
        f"{UPSTREAM_CONFIG} + {UPSTREAM_WEIGHTS})"
    )


def adapter_digest(path: str | os.PathLike) -> str:
    """SHA-256 of what identifies an adapter: its weight bytes and its identity metadata (format, config,
    backbone statistics without the path it was loaded from, chat settings) — never run facts."""
    path = resolve_adapter_dir(path)
    _, meta = read_adapter_config(path)
    h = hashlib.sha256()
    weights = path / (WEIGHTS_FILE if meta.get("format") == FORMAT else UPSTREAM_WEIGHTS)
    with weights.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    ident = _identity(meta) if meta.get("format") == FORMAT else {"upstream": meta.get("upstream_config")}
    h.update(json.dumps(ident, sort_keys=True).encode())
    return h.hexdigest()


def _check_backbone(saved: dict, model: nn.Module, path: Path) -> None:
    here = backbone_fingerprint(model)
    diffs = [f"{k}: adapter {saved.get(k)!r} vs model {here[k]!r}" for k in _SHAPE_KEYS if saved.get(k) != here[k]]
    for k in ("layer0_q_mean_abs", "layer0_q_std"):  # survives dtype casts, catches another checkpoint
        a, b = saved.get(k), here[k]
        if a is not None and abs(a - b) > 2e-2 * max(abs(a), abs(b), 1e-12):
            diffs.append(f"{k}: adapter {a:.6g} vs model {b:.6g}")
    if diffs:
        raise ValueError(
            f"adapter {path} was trained on another backbone ({saved.get('name_or_path') or '?'}); "
            "mismatch: " + "; ".join(diffs)
        )


def _upstream_tensors(path: Path) -> dict[str, torch.Tensor]:
    file = path / UPSTREAM_WEIGHTS
    try:
        raw = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{file}: missing (an upstream adapter needs {UPSTREAM_WEIGHTS})") from e
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as e:
        # never suggest unsafe loading: a file that needs code execution is not an adapter we read
        raise ValueError(
            f"{file}: refused: not a plain tensor checkpoint (it is corrupt, or loading it would execute "
            "code from the file); re-export the adapter as tensors only"
        ) from e
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: expected a dict of tensors, got {type(raw).__name__}")
    out = {}
    for name, t in raw.items():
        m = re.search(r"layers\.(\d+)\.(?:.*\.)?([A-Za-z_]+)$", str(name))
        if m is None or not isinstance(t, torch.Tensor):
            raise ValueError(f"{file}: unexpected entry {name!r}")
        out[f"layers.{m.group(1)}.{m.group(2)}"] = t
    return out


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | os.PathLike, check_backbone: bool = True) -> nn.Module:
    """Load an adapter (ours or upstream) into ``model``, attaching δ-mem first if needed.

    The adapter's metadata stays on ``model.delta_mem.adapter_meta`` (its chat settings are what a
    :class:`~deltamem.MemorySession` speaks by default).
    """
    path = resolve_adapter_dir(path)
    config, meta = read_adapter_config(path)
    controller = getattr(model, "delta_mem", None)
    if controller is None:
        model = attach_delta_mem(model, config)
        controller = model.delta_mem
    elif controller.config != config:
        raise ValueError(f"adapter {path} config differs from the attached one: {config} vs {controller.config}")
    if meta["format"] == FORMAT:
        if check_backbone:
            _check_backbone(meta["backbone"], model, path)
        try:
            tensors = load_file(str(path / WEIGHTS_FILE))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{path / WEIGHTS_FILE}: missing") from e
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path / WEIGHTS_FILE}: not a readable safetensors file ({e})") from e
    else:
        if check_backbone and meta.get("exported"):
            _check_backbone(meta["backbone"], model, path)
        tensors = _upstream_tensors(path)
    params = dict(controller.named_parameters())
    for name, t in tensors.items():
        if name not in params:
            branch = re.match(r"layers\.\d+\.delta_([qkvo])_proj$", name)
            if branch and not bool(t.any()):
                continue  # upstream keeps zero tensors for inactive branches
            raise ValueError(f"{path}: tensor {name!r} has no matching δ-mem parameter (branches {config.branches})")
        if tuple(t.shape) != tuple(params[name].shape):
            raise ValueError(
                f"{path}: tensor {name!r} has shape {tuple(t.shape)}, the model expects {tuple(params[name].shape)}"
            )
        params[name].copy_(t.to(params[name].dtype))
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise ValueError(f"{path}: adapter lacks {len(missing)} parameter(s), e.g. {missing[:3]}")
    if meta["format"] != FORMAT and not meta.get("exported"):
        warnings.warn(f"imported upstream adapter {path} (backbone not checked)", stacklevel=2)
    controller.adapter_meta = meta
    return model
