r"""The δ-mem delta rule in chunked form: parallel inside chunks of C tokens, sequential only across T/C.

Same function as :mod:`naive` (see its docstring for the rule and the shapes). Each state row i is an
independent scalar-gated delta rule; drop the row index and write a_t = keep, b_t = erase, c_t = write.
Inside a chunk, with s_0 the row at the chunk start and Γ_t = ∏_{m≤t} a_m (Γ_0 = 1), the update
s_t = a_t s_{t-1} + w_t k_tᵀ with w_t = c_t v_t − b_t ⟨s_{t-1}, k_t⟩ unrolls to

    s_t = Γ_t s_0 + Σ_{j≤t} (Γ_t/Γ_j) w_j k_jᵀ.

Substituting it into w_t gives a unit lower-triangular system for all w of the chunk at once:

    w_t + b_t Σ_{j<t} (Γ_{t-1}/Γ_j) ⟨k_j, k_t⟩ w_j = c_t v_t − b_t Γ_{t-1} ⟨s_0, k_t⟩,

so w = u − W s_0 with u and W from one triangular solve that does not depend on s_0 (the UT/WY trick).
Then, per chunk,

    reads    r_t = Γ_{t-1} ⟨s_0, q_t⟩ + Σ_{j<t} (Γ_{t-1}/Γ_j) ⟨k_j, q_t⟩ w_j   (read before write)
    end row  s_C = (Γ_C I − Σ_j (Γ_C/Γ_j) k_j W_jᵀ) s_0 + Σ_j (Γ_C/Γ_j) u_j k_j,

an affine map of s_0. Everything except applying those C-token affine maps one after the other is
computed for all chunks in parallel; reads come last, from the chunk-start states. Decay ratios are
formed as exp(log Γ_a − log Γ_b) with a ≥ b, so they never exceed 1. Padding tokens get a = 1, b = c = 0:
they leave the state as it is, and their reads are set to 0. Plain autograd differentiates all of it.
"""

from __future__ import annotations

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
        keep = torch.where(m, keep, torch.ones_like(keep))
        erase = torch.where(m, erase, torch.zeros_like(erase))
        write = torch.where(m, write, torch.zeros_like(write))
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

    qc, kc = tokens(q), tokens(k)
    vr, a, b, c = rows(v), rows(keep), rows(erase), rows(write)

    log_a = torch.log(a.clamp_min(torch.finfo(a.dtype).tiny))
    cum = log_a.cumsum(-1)  # log Γ_t
    prev = cum - log_a  # log Γ_{t-1}
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)  # j < t
    decay = (prev.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(~strict, float("-inf")).exp()  # [..., R, C, C]

    kk = (kc @ kc.transpose(-1, -2)).unsqueeze(3)  # [B, H, N, 1, C, C]
    qk = (qc @ kc.transpose(-1, -2)).unsqueeze(3)
    gamma_prev = prev.exp()  # Γ_{t-1}

    lower = b.unsqueeze(-1) * decay * kk  # strictly lower; the unit diagonal is implied
    rhs = torch.cat(
        [(c * vr).unsqueeze(-1), (b * gamma_prev).unsqueeze(-1) * kc.unsqueeze(3)], dim=-1
    )  # [B, H, N, R, C, 1 + r]
    sol = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True)
    u, W = sol[..., 0], sol[..., 1:]  # w = u − W s_0

    decay_qk = decay * qk
    read_u = (decay_qk @ u.unsqueeze(-1)).squeeze(-1)  # [B, H, N, R, C]
    read_s = gamma_prev.unsqueeze(-1) * qc.unsqueeze(3) - decay_qk @ W  # [B, H, N, R, C, r]

    to_end = (cum[..., -1:] - cum).exp()  # Γ_C / Γ_j
    gamma_end = cum[..., -1].exp()  # Γ_C, [B, H, N, R]
    offset = torch.einsum("bhnrc,bhncd->bhnrd", to_end * u, kc)  # [B, H, N, R, r]
    transfer = torch.einsum("bhnrc,bhncd,bhnrce->bhnrde", to_end, kc, W)  # [B, H, N, R, r, r]

    # the only sequential part: per row and chunk the affine map s ← A s + o, A = Γ_C I − transfer; one
    # batched multiply-add per chunk (rows of all batch elements and sub-states form the batch)
    eye = torch.eye(r, dtype=transfer.dtype, device=transfer.device)
    A = gamma_end[..., None, None] * eye - transfer  # [B, H, N, R, r, r]
    A_n = A.permute(2, 0, 1, 3, 4, 5).reshape(N, B * H * r, r, r).unbind(0)
    o_n = offset.permute(2, 0, 1, 3, 4).reshape(N, B * H * r, r, 1).unbind(0)
    s = state.reshape(B * H * r, r, 1)
    starts = []
    for n in range(N):
        starts.append(s)
        s = torch.baddbmm(o_n[n], A_n[n], s)
    s_start = torch.stack(starts).view(N, B, H, r, r).permute(1, 2, 0, 3, 4)  # [B, H, N, R, r]
    s = s.view(B, H, r, r)
    reads = read_u + (read_s @ s_start.unsqueeze(-1)).squeeze(-1)  # [B, H, N, R, C]
    reads = reads.permute(0, 2, 4, 1, 3).reshape(B, N * C, H, r)[:, :T]
    if mask is not None:
        reads = torch.where(mask.view(B, T, 1, 1), reads, torch.zeros_like(reads))
    return reads, s
