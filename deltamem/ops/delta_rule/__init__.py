"""The δ-mem delta rule (read before write, row-wise gated) in three interchangeable forms.

``naive`` is the per-token reference, ``chunk`` the parallel-within-chunks form (CPU and GPU), ``fused``
the Triton kernels (GPU; CPU only under ``TRITON_INTERPRET=1``). All take and return the same tensors;
see :mod:`deltamem.ops.delta_rule.naive` for the rule and the shapes.
"""

from __future__ import annotations

import os

import torch

from .chunk import delta_rule_chunk
from .naive import delta_rule_naive, delta_rule_step
from .step import delta_rule_step_packed

BACKENDS = ("auto", "naive", "chunk", "fused")

__all__ = [
    "BACKENDS",
    "delta_rule",
    "delta_rule_chunk",
    "delta_rule_decode",
    "delta_rule_naive",
    "delta_rule_step",
    "delta_rule_step_packed",
    "fused_available",
    "resolve_backend",
]


def fused_available(device: torch.device | None = None) -> bool:
    """Triton importable, and either a CUDA device or the Triton interpreter."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return device is not None and device.type == "cuda"


def _resolve(backend: str, x: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        return "fused" if x.is_cuda and fused_available(x.device) else "chunk"
    if backend == "fused" and not fused_available(x.device):
        raise RuntimeError(
            "backend='fused' needs Triton (pip install 'deltamem[kernels]') and a CUDA device "
            "(or TRITON_INTERPRET=1 for the CPU interpreter)"
        )
    return backend


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """The backend a call with ``backend`` on tensors like ``x`` runs: naive, chunk or fused."""
    return _resolve(backend, x)


def delta_rule_decode(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    erase: torch.Tensor,
    write: torch.Tensor,
    valid: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token (decoding): the fused one-launch step on CUDA, the PyTorch step otherwise."""
    if _resolve(backend, q) == "fused":
        from .fused import delta_rule_step_fused

        return delta_rule_step_fused(state, q, k, v, keep, erase, write, valid)
    return delta_rule_step(state, q, k, v, keep, erase, write, valid)


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    erase: torch.Tensor,
    write: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    backend: str = "auto",
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the scan with the chosen backend. ``auto``: fused on CUDA with Triton, else chunk."""
    backend = _resolve(backend, q)
    if backend == "naive":
        return delta_rule_naive(q, k, v, keep, erase, write, initial_state, mask)
    if backend == "chunk":
        return delta_rule_chunk(q, k, v, keep, erase, write, initial_state, mask, chunk_size=chunk_size)
    from .fused import delta_rule_fused

    return delta_rule_fused(q, k, v, keep, erase, write, initial_state, mask)
