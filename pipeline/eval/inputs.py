"""Phase 2a of ``evaluate``: the inputs checked and fingerprinted before any shard runs.

Every problem found here is an :class:`~pipeline.eval.errors.EvalInputError` naming the file (and line,
record, tensor or field): a prepared split that cannot be read or disagrees with the prepare stage's
manifest, an adapter whose weights are unreadable, non-finite or trained on another backbone, a backbone
folder with a truncated safetensors file, an output folder that cannot be written. The digests
(:func:`tree_digest`) are what the shards' config hashes (:mod:`pipeline.eval.plan`) are made of.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.eval.errors import EvalInputError, describe_error


def file_digest(path: Path, whole_limit: int = 64 * 2**20, piece: int = 16 * 2**20) -> str:
    """sha256 of a file; above ``whole_limit`` bytes: of its size, first and last ``piece`` bytes."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f:
        if size <= whole_limit:
            for block in iter(lambda: f.read(2**20), b""):
                h.update(block)
        else:
            h.update(str(size).encode())
            h.update(f.read(piece))
            f.seek(size - piece)
            h.update(f.read(piece))
    return h.hexdigest()


def tree_digest(path: Path) -> str:
    """Digest of a file or of every file in a folder (names + contents, see :func:`file_digest`)."""
    if path.is_file():
        return file_digest(path)
    if not path.is_dir():
        if path.is_absolute():  # never hash a machine's absolute path (results must survive a move)
            raise FileNotFoundError(f"{path}: not found")
        return f"name:{path}"  # a hub id or `embedded`: identified by its name
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode())
        h.update(file_digest(p).encode())
    return h.hexdigest()


def resolve_path(root: Path, value: str) -> str:
    """``value`` relative to ``root`` when that exists, else as given (a hub id or ``embedded``)."""
    candidate = root / value
    return str(candidate) if candidate.exists() else value


def read_prepared_split(path: Path) -> list[Any]:
    """:func:`pipeline.data.schema.read_split` with every input problem as an :class:`EvalInputError`
    naming the file (and line / record / field where known)."""
    from pipeline.data.errors import DataError
    from pipeline.data.schema import contexts_path, read_split

    try:
        return read_split(path)
    except DataError as err:
        raise EvalInputError(str(err)) from None
    except UnicodeDecodeError as err:  # raised while iterating: which of the two files?
        bad = path
        ctx = contexts_path(path)
        if ctx.exists():
            try:
                ctx.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                bad = ctx
        raise EvalInputError(describe_error(err, bad)) from None
    except OSError as err:
        raise EvalInputError(describe_error(err, path)) from None


def check_manifest_count(data_dir: Path, dataset: str, split: str, path: Path, n: int) -> None:
    """A split whose record count differs from what the prepare stage's manifest recorded is an error
    (a truncated or replaced file would otherwise be evaluated silently on fewer questions)."""
    manifest = data_dir / "manifest.json"
    if not manifest.exists() and not manifest.is_symlink():
        return  # prepared by hand: nothing to compare with
    if not manifest.is_file():
        raise EvalInputError(f"{manifest}: not a file (expected the prepare stage's manifest.json)")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise EvalInputError(describe_error(err, manifest)) from None
    if not isinstance(data, dict):
        raise EvalInputError(
            f"{manifest}: expected a JSON object (the prepare stage's manifest), got {type(data).__name__}"
        )
    info = (data.get("datasets") or {}).get(dataset, {}).get("splits", {}).get(split)
    expected = info.get("examples") if isinstance(info, dict) else None
    if expected is None:
        return  # this split is not in the manifest (added by hand)
    if not isinstance(expected, int) or isinstance(expected, bool):
        raise EvalInputError(
            f"{manifest}: datasets.{dataset}.splits.{split}.examples is {expected!r}; expected an integer count"
        )
    if expected != n:
        raise EvalInputError(
            f"{path}: {n} records, but {manifest} lists {expected} for {dataset}/{split} "
            "(a truncated or replaced file? rerun the prepare stage)"
        )


def _backbone_facts(folder: Path) -> dict[str, Any] | None:
    """The shape facts of :func:`deltamem.attach.backbone_fingerprint` from a local Hugging Face folder's
    ``config.json`` (and layer 0's q_proj statistics from its safetensors when found), without loading
    the model; None when the folder has no readable config."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}
    hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    if not isinstance(hidden, int) or not isinstance(heads, int) or heads <= 0:
        return None
    head_dim = cfg.get("head_dim") or hidden // heads
    kv_heads = cfg.get("num_key_value_heads") or heads
    facts: dict[str, Any] = {
        "hidden_size": hidden,
        "num_hidden_layers": cfg.get("num_hidden_layers"),
        "q_out": heads * head_dim,
        "kv_out": kv_heads * head_dim,
        "o_in": heads * head_dim,
    }
    q = _layer0_q_weight(folder)
    if q is not None:
        facts["layer0_q_mean_abs"], facts["layer0_q_std"] = float(q.abs().mean()), float(q.std())
    return facts


def _layer0_q_weight(folder: Path) -> Any:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            names = [k for k in weight_map if k.endswith("layers.0.self_attn.q_proj.weight")]
            files = [folder / weight_map[names[0]]] if names else []
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():  # noqa: SIM118  (safe_open has no __iter__)
                    if k.endswith("layers.0.self_attn.q_proj.weight"):
                        return st.get_tensor(k).float()
    except Exception:  # an unreadable backbone is the worker's error to report; this is only a pre-check
        return None
    return None


def check_adapter(path: Path, meta: Mapping[str, Any], backbone: Path | None) -> None:
    """Planning-time check of an adapter folder: weights readable and finite, and (for a local backbone
    folder) trained on that backbone. Raises :class:`EvalInputError` naming the file / tensor / field."""
    import torch

    from deltamem.adapter import FORMAT, UPSTREAM_WEIGHTS, WEIGHTS_FILE

    ours = meta.get("format") == FORMAT
    weights = path / (WEIGHTS_FILE if ours else UPSTREAM_WEIGHTS)
    if not weights.is_file():
        raise EvalInputError(f"{weights}: adapter weights not found")
    try:
        if ours:
            from safetensors.torch import load_file

            tensors = load_file(str(weights))
        else:
            raw = torch.load(weights, map_location="cpu", weights_only=True)  # never unpickles objects
            tensors = raw if isinstance(raw, dict) else {}
    except Exception as err:  # safetensors / torch raise their own error types for corrupt files
        raise EvalInputError(f"{weights}: unreadable adapter weights ({describe_error(err)})") from None
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise EvalInputError(f"{weights}: tensor {name!r} has {bad} non-finite value(s) (NaN/Inf)")
    saved = meta.get("backbone")
    facts = _backbone_facts(backbone) if ours and backbone is not None and isinstance(saved, Mapping) else None
    if facts is None:
        return
    diffs = [
        f"{k}: adapter {saved.get(k)!r} vs backbone {v!r}"
        for k, v in facts.items()
        if k in _SHAPE_FACTS and saved.get(k) != v
    ]
    for k in ("layer0_q_mean_abs", "layer0_q_std"):  # the weights' statistics: another checkpoint
        a, b = saved.get(k), facts.get(k)
        if isinstance(a, int | float) and b is not None and abs(a - b) > 2e-2 * max(abs(a), abs(b), 1e-12):
            diffs.append(f"{k}: adapter {a:.6g} vs backbone {b:.6g}")
    if diffs:
        raise EvalInputError(
            f"{path}: the adapter was trained on a different backbone than evaluate.backbone ({backbone}); "
            "mismatch: " + "; ".join(diffs)
        )


def check_backbone_folder(folder: Path) -> None:
    """A local backbone folder's files are readable before any worker loads it
    (:func:`pipeline.backbone.check_backbone_folder`, the train stage's check too)."""
    from pipeline.backbone import InputError
    from pipeline.backbone import check_backbone_folder as check

    try:
        check(folder, "backbone")
    except InputError as err:
        raise EvalInputError(str(err)) from None


_SHAPE_FACTS = ("hidden_size", "num_hidden_layers", "q_out", "kv_out", "o_in")


def check_writable(folder: Path, what: str) -> None:
    """Create ``folder`` and write (then remove) a probe file, so that a read-only or full disk is found
    before any shard is computed."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
        try:
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            Path(tmp).unlink(missing_ok=True)
    except OSError as err:
        raise EvalInputError(f"{what} {folder}: not writable ({err.strerror or err})") from None
