r"""One decode token of the δ-mem delta rule in a handful of PyTorch ops (the lean form of ``delta_rule_step``).

Same rule as :func:`deltamem.ops.delta_rule.naive.delta_rule_step` (the reference), with q and k packed
as the two columns of one tensor so that both state products come from one batched matmul:

    [r_t, S k_t] = S_{t−1} [q_t, k_t]                              (one bmm, read before write)
    S_t = keep ⊙ S_{t−1} + (write ⊙ v_t − erase ⊙ S_{t−1} k_t) k_tᵀ   (two fused multiply-adds)

No host synchronisation and no data-dependent shapes: padding (``valid == False``) is handled with
``torch.where`` on the device, so the step can be captured in a CUDA graph or compiled whole.
"""

from __future__ import annotations

import torch


def delta_rule_step_packed(
    state: torch.Tensor,
    qk: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    erase: torch.Tensor,
    write: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``state`` [B, H, r, r]; ``qk`` [B, H, r, 2] (q and k as columns); v and the gates [B, H, r];
    ``valid`` [B] bool or None. Returns (read [B, H, r], new state [B, H, r, r])."""
    prods = torch.matmul(state, qk)  # [B, H, r, 2]: S q and S k
    read, sk = prods.unbind(-1)
    coeff = torch.addcmul(write * v, erase, sk, value=-1.0)  # write·v − erase·(S k), one value per row
    new_state = torch.addcmul(keep.unsqueeze(-1) * state, coeff.unsqueeze(-1), qk[..., 1].unsqueeze(-2))
    if valid is not None:
        m = valid.view(-1, 1, 1, 1)
        new_state = torch.where(m, new_state, state)
        read = torch.where(m.view(-1, 1, 1), read, 0.0)
    return read, new_state
