"""The memory state: one fp32 tensor [B, H, r, r] per attached layer, plus an optional KV cache.

It is tiny (Qwen3-4B, 36 layers, r = 8: 9 KiB per conversation), can be saved/loaded with safetensors,
batched (``expand`` one state to many questions, ``select``/``stack`` rows) and reused for any number of
read-only questions without recomputation. Writes replace the per-layer tensors (never modify them in
place), so a state keeps its autograd graph during training and ``clone()`` is cheap.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


@dataclass
class MemoryState:
    """Per-layer δ-mem states. ``layers`` maps decoder-layer index → tensor [B, H, r, r] (fp32).

    ``cache`` optionally holds the backbone's KV cache of everything written so far (only when written
    with ``keep_cache=True``): a later write then continues at the right positions and attends to the
    earlier tokens, so writing a history in parts equals writing it in one pass.
    """

    layers: dict[int, torch.Tensor]
    cache: Any = None
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def zeros(
        cls,
        layer_ids: list[int],
        batch_size: int,
        num_substates: int,
        rank: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> MemoryState:
        return cls(
            {i: torch.zeros(batch_size, num_substates, rank, rank, device=device, dtype=dtype) for i in layer_ids},
            meta={"rank": rank, "num_substates": num_substates},
        )

    @property
    def batch_size(self) -> int:
        return next(iter(self.layers.values())).shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the δ-mem state itself (the KV cache, if kept, is not counted)."""
        return sum(t.numel() * t.element_size() for t in self.layers.values())

    @property
    def seen_tokens(self) -> int:
        return 0 if self.cache is None else int(self.cache.get_seq_length())

    def _map(self, fn) -> MemoryState:
        return MemoryState({i: fn(t) for i, t in self.layers.items()}, cache=None, meta=dict(self.meta))

    def clone(self) -> MemoryState:
        """A copy whose later writes do not affect this state (the KV cache, if any, is not copied)."""
        return self._map(lambda t: t.clone())

    def detach(self) -> MemoryState:
        return self._map(lambda t: t.detach())

    def to(self, device: torch.device | str) -> MemoryState:
        return self._map(lambda t: t.to(device))

    def expand(self, batch_size: int) -> MemoryState:
        """Repeat a batch-1 state to ``batch_size`` rows (e.g. one conversation, many questions)."""
        if self.batch_size == batch_size:
            return self
        if self.batch_size != 1:
            raise ValueError(f"cannot expand a state with batch size {self.batch_size} to {batch_size}")
        return self._map(lambda t: t.expand(batch_size, *t.shape[1:]).contiguous())

    def select(self, index: int | list[int]) -> MemoryState:
        idx = [index] if isinstance(index, int) else list(index)
        return self._map(lambda t: t[idx])

    @classmethod
    def stack(cls, states: list[MemoryState]) -> MemoryState:
        """Concatenate states along the batch dimension (all must cover the same layers)."""
        keys = list(states[0].layers)
        if any(list(s.layers) != keys for s in states):
            raise ValueError("MemoryState.stack: states cover different layers")
        return cls({i: torch.cat([s.layers[i] for s in states]) for i in keys}, meta=dict(states[0].meta))

    def equal(self, other: MemoryState, atol: float = 0.0) -> bool:
        if list(self.layers) != list(other.layers):
            return False
        return all(torch.allclose(self.layers[i], other.layers[i], atol=atol, rtol=0) for i in self.layers)

    # --- persistence ----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write ``path`` (a .safetensors file) atomically. The KV cache is not saved."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"layers.{i}": t.detach().contiguous().cpu() for i, t in self.layers.items()}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"deltamem_state": json.dumps(self.meta)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> MemoryState:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"memory state file not found: {path}")
        tensors = load_file(str(path), device=str(device))
        layers: dict[int, torch.Tensor] = {}
        for name, t in tensors.items():
            if not name.startswith("layers.") or t.dim() != 4:
                raise ValueError(f"{path}: entry {name!r} is not a δ-mem state tensor layers.<i> [B, H, r, r]")
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise ValueError(f"{path}: state tensor {name!r} is not finite floating point (NaN/Inf or {t.dtype})")
            if t.dtype != torch.float32:  # states are accumulated in fp32; a low-precision copy is upcast
                warnings.warn(f"{path}: state tensor {name!r} is {t.dtype}; cast to float32", stacklevel=2)
                t = t.float()
            layers[int(name.split(".", 1)[1])] = t
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("deltamem_state", "{}"))
        return cls(dict(sorted(layers.items())), meta=meta)
