r"""The δ-mem delta rule, one token at a time: the reference every fast path is tested against.

For each batch element b and sub-state h the state S ∈ R^{r×r} (rows = value dims, columns = key dims)
evolves as

    r_t = S_{t-1} q_t                                                   (read *before* write)
    S_t = diag(keep_t) S_{t-1} − diag(erase_t) (S_{t-1} k_t) k_tᵀ + diag(write_t) v_t k_tᵀ

i.e. row by row ``s_i ← keep_i s_i + (write_i v_i − erase_i ⟨s_i, k_t⟩) k_t``: every row is an
independent scalar-gated delta rule with key size r and value size 1. The error term uses the *undecayed*
state (unlike Gated DeltaNet, which decays first). Tokens with ``mask == False`` (padding) neither read
(their read is 0) nor write (the state passes through unchanged).

Shapes (H sub-states, r the rank):
    q, k, v, keep, erase, write: [B, T, H, r]   (keep/erase/write are per state row)
    initial_state, final state:  [B, H, r, r]
    mask:                        [B, T] bool (True = real token) or None
    reads:                       [B, T, H, r]
"""

from __future__ import annotations

import torch


def delta_rule_step(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    erase: torch.Tensor,
    write: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: ``state`` [B, H, r, r], the rest [B, H, r], ``valid`` [B] bool. Returns (read, new state)."""
    read = torch.einsum("bhij,bhj->bhi", state, q)
    sk = torch.einsum("bhij,bhj->bhi", state, k)  # S_{t-1} k_t, one value per row
    coeff = write * v - erase * sk  # [B, H, r]
    new_state = keep.unsqueeze(-1) * state + coeff.unsqueeze(-1) * k.unsqueeze(-2)
    if valid is not None:
        m = valid.view(-1, 1, 1, 1)
        new_state = torch.where(m, new_state, state)
        read = torch.where(m.view(-1, 1, 1), read, torch.zeros_like(read))
    return read, new_state


def delta_rule_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    erase: torch.Tensor,
    write: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loop over T. Returns ``(reads [B, T, H, r], final_state [B, H, r, r])``."""
    B, T, H, r = q.shape
    state = initial_state if initial_state is not None else torch.zeros(B, H, r, r, dtype=q.dtype, device=q.device)
    reads = []
    for t in range(T):
        valid = None if mask is None else mask[:, t]
        read, state = delta_rule_step(state, q[:, t], k[:, t], v[:, t], keep[:, t], erase[:, t], write[:, t], valid)
        reads.append(read)
    out = torch.stack(reads, dim=1) if reads else q.new_zeros(B, 0, H, r)
    return out, state
