r"""One decode token of the δ-mem delta rule in a handful of PyTorch ops (the lean form of ``delta_rule_step``).

Same rule as :func:`deltamem.ops.delta_rule.naive.delta_rule_step` (the reference), with q and k packed
as the two rows of one operand so that both state products come from one batched matmul:

    [r_t, S k_t]ᵀ = [q_t, k_t]ᵀ S_{t−1}ᵀ                           (one bmm, read before write)
    S_t = keep ⊙ S_{t−1} + (write ⊙ v_t − erase ⊙ S_{t−1} k_t) k_tᵀ   (two fused multiply-adds)

The layouts are chosen so that every operand is a strided view of a tensor the caller already has (no
``select``/``unsqueeze``/``permute`` chains): each dispatched op is a profiler event, and on a GPU at
batch 1 each one is a launch. No host synchronisation and no data-dependent shapes, so the step can be
captured in a CUDA graph or compiled whole. Padding is the caller's: with q = k = 0 and
erase = write = 0, keep = 1 for a padded token the state stays exactly as it was and the read is 0
(:meth:`deltamem.memory.DeltaMemLayer.forward` folds its mask in that way).
"""

from __future__ import annotations

import torch


def state_matrices(state: torch.Tensor) -> torch.Tensor:
    """``state`` [B, H, r, r] as [B·H, r, r]: a view when the batch and sub-state strides merge (always for
    H = 1, an expanded batch included), else a copy."""
    B, H, r, _ = state.shape
    if H == 1 or state.stride(0) == H * state.stride(1):
        return state.view(B * H, r, r)
    return state.reshape(B * H, r, r)


def delta_rule_step_packed(
    state: torch.Tensor,
    qk: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor | None,
    erase: torch.Tensor,
    write: torch.Tensor,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``state`` [B, H, r, r]; ``qk`` [B, H, 2, r], a fresh tensor (contiguous, storage offset 0: the
    strided views below address it absolutely) holding q_t then k_t of each sub-state; ``v`` and the
    gates [B, H, r, 1] (one value per state row, as columns); ``keep=None`` means keep = 1. ``out``
    (inference): the buffer the new state is written into, e.g. ``state`` itself (everything read
    from S is computed before the last op writes it): the state stays at its address, no extra copy.

    Returns (read [B, H·r] (sub-states concatenated, as the correction matmul takes it), new state
    [B, H, r, r])."""
    B, H, _, r = qk.shape
    n = H * r
    # [BH, 2, r]: rows (S q)ᵀ and (S k)ᵀ, as qkᵀ Sᵀ so that the read rows are what the next matmul takes
    prods = torch.bmm(qk.view(B * H, 2, r), state_matrices(state).transpose(1, 2))
    if H == 1:
        read = prods.as_strided((B, n), (2 * n, 1))  # row 0 of each batch element, no copy
    else:
        read = prods.view(B, H, 2, r)[:, :, 0].reshape(B, n)
    sk = prods.as_strided((B, H, r, 1), (2 * n, 2 * r, 1, 1), r)  # row 1, as a column
    coeff = torch.addcmul(write * v, erase, sk, value=-1.0)  # write·v − erase·(S k), one value per row
    k_row = qk.as_strided((B, H, 1, r), (2 * n, 2 * r, r, 1), r)
    kept = state if keep is None else keep * state
    new_state = torch.addcmul(kept, coeff, k_row) if out is None else torch.addcmul(kept, coeff, k_row, out=out)
    return read, new_state
