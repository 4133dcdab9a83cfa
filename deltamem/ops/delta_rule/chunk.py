r"""The δ-mem delta rule in chunked form: parallel inside chunks of C tokens, sequential only across T/C.

Same function as :mod:`naive` (see its docstring for the rule and the shapes). Each state row i is an
independent scalar-gated delta rule; drop the row index and write a_t = keep, b_t = erase, c_t = write.
Inside a chunk, with s_0 the row at the chunk start and Γ_t = ∏_{m≤t} a_m (Γ_0 = 1), the update
s_t = a_t s_{t-1} + w_t k_tᵀ with w_t = c_t v_t − b_t ⟨s_{t-1}, k_t⟩ unrolls to

    s_t = Γ_t s_0 + Σ_{j≤t} (Γ_t/Γ_j) w_j k_jᵀ.

Substituting it into w_t gives a unit lower-triangular system for all w of the chunk at once:

    w_t + b_t Σ_{j<t} (Γ_{t-1}/Γ_j) ⟨k_j, k_t⟩ w_j = c_t v_t − b_t Γ_{t-1} ⟨s_0, k_t⟩,

so w = u − W s_0 with u and W from one triangular solve that does not depend on s_0 (the UT/WY trick);
it is solved for [u | −W] at once, so that w = [u | −W] [1; s_0]. Then, per chunk,

    reads    r_t = Γ_{t-1} ⟨s_0, q_t⟩ + Σ_{j<t} (Γ_{t-1}/Γ_j) ⟨k_j, q_t⟩ w_j   (read before write)
    end row  s_C = (Γ_C I − Σ_j (Γ_C/Γ_j) k_j W_jᵀ) s_0 + Σ_j (Γ_C/Γ_j) u_j k_j,

an affine map of s_0, applied as one (1+r)×(1+r) matrix to [1; s_0] (one batched matmul per chunk). Only
applying those maps one after the other is sequential; everything else is computed for all chunks at once,
the reads last, from w and the chunk-start states. Decay ratios are formed as exp(log Γ_a − log Γ_b) with
a ≥ b, so they never exceed 1, the exponent clamped at log(tiny): a ratio below the smallest normal float
is as good as 0 and keeps the exp off the subnormal range (10–100× slower on CPU). Padding tokens get
a = 1, b = c = 0: they leave the state as it is, and their reads are set to 0. Plain autograd
differentiates all of it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def delta_rule_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    erase: torch.Tensor,
    write: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked scan. Returns ``(reads [B, T, H, r], final_state [B, H, r, r])``, equal to the naive loop.

    Half-precision inputs (bf16/fp16) are computed in fp32 (the triangular solve needs it) and the results
    cast back to the inputs' dtypes."""
    if q.dtype in (torch.bfloat16, torch.float16):
        out_dtype = q.dtype
        s_dtype = initial_state.dtype if initial_state is not None else q.dtype
        xs = [t.float() for t in (q, k, v, keep, erase, write)]
        s0 = initial_state.float() if initial_state is not None else None
        reads, state = delta_rule_chunk(*xs, s0, mask, chunk_size=chunk_size)
        return reads.to(out_dtype), state.to(s_dtype)
    B, T, H, r = q.shape
    state = initial_state if initial_state is not None else q.new_zeros(B, H, r, r)
    if T == 0:
        return q.new_zeros(B, 0, H, r), state
    if mask is not None:
        m = mask.view(B, T, 1, 1)
        keep, erase, write = torch.where(m, keep, 1.0), torch.where(m, erase, 0.0), torch.where(m, write, 0.0)
    C = min(chunk_size, T)
    N = -(-T // C)
    pad = N * C - T
    if pad:  # padded tail: identity steps (a = 1, b = c = 0)
        q, k, v, erase, write = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v, erase, write))
        keep = F.pad(keep, (0, 0, 0, 0, 0, pad), value=1.0)

    def tokens(x: torch.Tensor) -> torch.Tensor:  # [B, N*C, H, r] -> [B, H, N, C, r]
        return x.view(B, N, C, H, r).permute(0, 3, 1, 2, 4)

    def rows(x: torch.Tensor) -> torch.Tensor:  # [B, N*C, H, r] -> [B, H, N, R=r, C]
        return x.view(B, N, C, H, r).permute(0, 3, 1, 4, 2)

    # contiguous copies; the tokens get a leading 0 coordinate, matching the 1 of [1; s]
    qkc = F.pad(torch.stack([tokens(q), tokens(k)]), (1, 0))  # [2, B, H, N, C, 1 + r]
    qc, kc = qkc
    vr, a, b, c = torch.stack([rows(x) for x in (v, keep, erase, write)])  # [B, H, N, R, C]

    tiny = torch.finfo(q.dtype).tiny
    lo = math.log(tiny)
    log_a = torch.log(a.clamp_min(tiny))
    cum = log_a.cumsum(-1)  # log Γ_t
    prev = cum - log_a  # log Γ_{t-1}
    decay = (prev.unsqueeze(-1) - cum.unsqueeze(-2)).clamp_(lo, 0.0).exp_()  # Γ_{t-1}/Γ_j, [.., R, C, C]
    strict = torch.ones(C, C, dtype=q.dtype, device=q.device).tril_(-1)  # j < t
    qk, kk = (qkc @ kc.mT * strict).unsqueeze(4)  # [B, H, N, 1, C, C]
    gamma_prev = prev.clamp_min(lo).exp()  # Γ_{t-1}
    to_end = (cum[..., -1:] - cum).clamp_min(lo).exp()  # Γ_C/Γ_j

    lower = decay * (b.unsqueeze(-1) * kk)  # strictly lower; the unit diagonal is implied
    x = torch.stack([-b * gamma_prev, to_end]).unsqueeze(-1) * kc.unsqueeze(3)  # [2, .., R, C, 1 + r]
    rhs, ke = x[0], x[1]  # ke = (Γ_C/Γ_j) [0, k_j]
    rhs[..., 0] = c * vr  # rhs = [c_t v_t | −b_t Γ_{t-1} k_t]
    # X Lᵀ = Bᵀ with Lᵀ upper: the transposed views are the column-major layout LAPACK takes without copies
    sol = torch.linalg.solve_triangular(lower.mT, rhs.mT, upper=True, left=False, unitriangular=True).mT
    # the map [1; s_0] -> [1; s_C]: rows 1.. are [Σ_j (Γ_C/Γ_j) u_j k_j | −Σ_j (Γ_C/Γ_j) k_j W_jᵀ] + diag(1, Γ_C)
    aug = ke.mT @ sol  # [B, H, N, R, 1 + r, 1 + r], row 0 is 0
    gamma_end = cum[..., -1:].clamp_min(lo).exp().expand(*cum.shape[:-1], r)
    aug.diagonal(0, -2, -1).add_(F.pad(gamma_end, (1, 0), value=1.0))

    # the only sequential part: one batched matmul per chunk (rows of all batch elements and sub-states)
    M = B * H * r
    maps = aug.permute(2, 0, 1, 3, 4, 5).reshape(N, M, r + 1, r + 1).unbind(0)
    s = F.pad(state.reshape(M, r, 1), (0, 0, 1, 0), value=1.0)  # [1; s_0]
    starts = []
    for n in range(N):
        starts.append(s)
        s = torch.bmm(maps[n], s)
    s_start = torch.stack(starts).view(N, B, H, r, r + 1).permute(1, 2, 0, 3, 4)  # [1; s] [B, H, N, R, 1 + r]
    s = s[:, 1:].view(B, H, r, r)

    w = sol @ s_start.unsqueeze(-1)  # [.., R, C, 1]
    reads = torch.baddbmm(
        (gamma_prev * (s_start @ qc.mT)).view(-1, C, 1), (decay * qk).view(-1, C, C), w.view(-1, C, 1)
    )  # [B·H·N·R, C, 1]
    reads = reads.view(B, H, N, r, C).permute(0, 2, 4, 1, 3).reshape(B, N * C, H, r)[:, :T]
    if mask is not None:
        reads = torch.where(mask.view(B, T, 1, 1), reads, 0.0)
    return reads, s
