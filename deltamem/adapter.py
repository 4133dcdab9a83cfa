"""Adapter files: only the δ-mem parameters, never the backbone.

Ours: a directory with ``config.json`` ({"format": "deltamem-adapter", "config": DeltaMemConfig,
"backbone": fingerprint}) and ``adapter.safetensors`` (tensors ``layers.<i>.<param>``, fp32).
Upstream (``declare-lab/delta-Mem``): ``delta_mem_config.json`` + ``delta_mem_adapter.pt``, a dict of raw
tensors ``<attention module path>.<param>``; it is read with ``torch.load(weights_only=True)`` (never
unpickling arbitrary objects) and mapped onto our names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .attach import attach_delta_mem, backbone_fingerprint
from .config import DeltaMemConfig

FORMAT = "deltamem-adapter"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "adapter.safetensors"
UPSTREAM_CONFIG, UPSTREAM_WEIGHTS = "delta_mem_config.json", "delta_mem_adapter.pt"
_SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "q_out", "kv_out", "o_in")


def save_adapter(model: nn.Module, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write the adapter directory atomically (temp dir, then rename over ``path``)."""
    controller = model.delta_mem
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp"))
    try:
        tensors = {n: p.detach().float().contiguous().cpu() for n, p in controller.named_parameters()}
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        meta = {
            "format": FORMAT,
            "config": controller.config.to_dict(),
            "backbone": controller.fingerprint,
            **(extra or {}),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_adapter_config(path: str | os.PathLike) -> tuple[DeltaMemConfig, dict]:
    """(config, metadata) of an adapter directory in either format."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        meta = json.loads((path / CONFIG_FILE).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path / CONFIG_FILE}: field 'format' must be {FORMAT!r}, got {meta.get('format')!r}")
        return DeltaMemConfig.from_dict(meta["config"]), meta
    if (path / UPSTREAM_CONFIG).is_file():
        raw = json.loads((path / UPSTREAM_CONFIG).read_text())
        return DeltaMemConfig.from_upstream(raw), {"format": "upstream", "upstream_config": raw}
    raise FileNotFoundError(
        f"{path}: not a δ-mem adapter (expected {CONFIG_FILE} + {WEIGHTS_FILE}, or upstream "
        f"{UPSTREAM_CONFIG} + {UPSTREAM_WEIGHTS})"
    )


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
    raw = torch.load(path / UPSTREAM_WEIGHTS, map_location="cpu", weights_only=True)
    if not isinstance(raw, dict):
        raise ValueError(f"{path / UPSTREAM_WEIGHTS}: expected a dict of tensors, got {type(raw).__name__}")
    out = {}
    for name, t in raw.items():
        m = re.search(r"layers\.(\d+)\.(?:.*\.)?([A-Za-z_]+)$", name)
        if m is None or not isinstance(t, torch.Tensor):
            raise ValueError(f"{path / UPSTREAM_WEIGHTS}: unexpected entry {name!r}")
        out[f"layers.{m.group(1)}.{m.group(2)}"] = t
    return out


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | os.PathLike, check_backbone: bool = True) -> nn.Module:
    """Load an adapter (ours or upstream) into ``model``, attaching δ-mem first if needed."""
    path = Path(path)
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
        tensors = load_file(str(path / WEIGHTS_FILE))
    else:
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
    if meta["format"] != FORMAT:
        warnings.warn(f"imported upstream adapter {path} (backbone not checked)", stacklevel=2)
    return model
