r"""One δ-mem memory, attached to one attention layer.

x_t is the hidden state entering the attention module (after the decoder layer's input norm).
With H sub-states of rank r (H = 1 except for MSW) and s = α / r:

    q_t = L2norm(tanh(W_q x_t)),  k_t = L2norm(tanh(W_k x_t)),  v_t = W_v x_t      (per sub-state, ∈ R^r)
    β_t = σ(W_β x_t + b_β)  (one per state row; W_β = 0, b_β = −1.5 at init)
    λ_t = 1 − β_t  (coupled)  or  σ(W_λ x_t + b_λ)
    keep, erase, write = (λ, β, β) | (λ, λβ, β) | (1, β, β)        by ``state_update_mode``
    r_t = S_{t−1} q_t                                               (read before write)
    S_t = diag(keep) S_{t−1} − diag(erase)(S_{t−1} k_t) k_tᵀ + diag(write) v_t k_tᵀ
    Δh_t = s · U_h [r_t^1; …; r_t^H]     for h ∈ branches; Δq/Δk/Δv are added to the q/k/v projections'
                                         outputs (before head reshape, q/k norms and RoPE), Δo after o_proj.

Everything here runs in fp32 whatever the backbone dtype (the state is fp32). Parameter names follow
the reference implementation (``memory_q_proj``, ``delta_o_proj``, ``beta_bias``, …) so upstream
adapters map one to one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import DeltaMemConfig
from .ops.delta_rule import delta_rule, delta_rule_decode


class DeltaMemLayer(nn.Module):
    def __init__(self, config: DeltaMemConfig, attn: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.rank, self.num_substates = config.rank, int(config.num_substates or 1)
        d, n = hidden_size, config.state_dim
        gates = n if config.rankwise_gates else self.num_substates
        self.memory_q_proj = nn.Parameter(torch.empty(n, d))
        self.memory_k_proj = nn.Parameter(torch.empty(n, d))
        self.memory_v_proj = nn.Parameter(torch.empty(n, d))
        self.beta_proj = nn.Parameter(torch.zeros(gates, d))
        self.beta_bias = nn.Parameter(torch.full((gates,), config.beta_bias_init))
        if not config.couple_lambda:
            self.lambda_proj = nn.Parameter(torch.zeros(gates, d))
            self.lambda_bias = nn.Parameter(torch.full((gates,), -config.beta_bias_init))
        self.out_features: dict[str, int] = {}
        for branch in config.branches:
            base = getattr(attn, f"{branch}_proj")
            self.out_features[branch] = base.out_features
            setattr(self, f"delta_{branch}_proj", nn.Parameter(torch.empty(base.out_features, n)))
        self.reset_parameters(attn)

    @torch.no_grad()
    def reset_parameters(self, attn: nn.Module) -> None:
        for w in (self.memory_q_proj, self.memory_k_proj, self.memory_v_proj):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        for branch in self.config.branches:
            u = getattr(self, f"delta_{branch}_proj")
            u.zero_()
            if self.config.output_init == "base_slice_fixed":
                base = getattr(attn, f"{branch}_proj").weight
                w = min(self.config.base_slice_width, self.rank, base.shape[1], u.shape[1])
                cols = F.normalize(base[:, :w].detach().float(), dim=0, eps=1e-6)
                u[:, :w] = self.config.online_gain * cols

    # --- projections -------------------------------------------------------------------------------
    def _split(self, x: torch.Tensor) -> torch.Tensor:  # [..., H·r] -> [..., H, r]
        return x.view(*x.shape[:-1], self.num_substates, self.rank)

    def _gate(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(F.linear(x, weight, bias))
        if not self.config.rankwise_gates:  # one scalar per sub-state, shared by its rows
            return g.unsqueeze(-1).expand(*g.shape, self.rank)
        return self._split(g)

    def project(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x [..., d] (any dtype) → q, k, v, keep, erase, write, beta, each [..., H, r] in fp32."""
        x = x.float()
        q = self._split(F.linear(x, self.memory_q_proj))
        k = self._split(F.linear(x, self.memory_k_proj))
        v = self._split(F.linear(x, self.memory_v_proj))
        if self.config.normalize_qk:
            q = F.normalize(torch.tanh(q), dim=-1, eps=1e-6)
            k = F.normalize(torch.tanh(k), dim=-1, eps=1e-6)
        beta = self._gate(x, self.beta_proj, self.beta_bias)
        if self.config.couple_lambda:
            lam = 1.0 - beta
        else:
            lam = self._gate(x, self.lambda_proj, self.lambda_bias)
        mode = self.config.state_update_mode
        if mode == "standard":
            keep, erase = lam, beta
        elif mode == "lambda_outside":
            keep, erase = lam, lam * beta
        else:  # no_lambda
            keep, erase = torch.ones_like(beta), beta
        return {"q": q, "k": k, "v": v, "keep": keep, "erase": erase, "write": beta, "beta": beta}

    def corrections(self, reads: torch.Tensor) -> dict[str, torch.Tensor]:
        """reads [B, T, H, r] → {branch: s·U_h·reads} with shapes [B, T, out_features] (fp32)."""
        flat = reads.reshape(*reads.shape[:-2], -1)
        return {b: self.config.scale * F.linear(flat, getattr(self, f"delta_{b}_proj")) for b in self.config.branches}

    # --- the three ways a call can touch the state ------------------------------------------------
    @staticmethod
    def read_only(state: torch.Tensor, p: dict[str, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
        reads = torch.einsum("bhij,bthj->bthi", state, p["q"])
        if mask is not None:
            reads = reads * mask[:, :, None, None].to(reads.dtype)
        return reads

    def write_tokens(
        self, state: torch.Tensor, p: dict[str, torch.Tensor], mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """TSW/MSW: one write per token (read before each write). Returns (reads, new state)."""
        args = (p["q"], p["k"], p["v"], p["keep"], p["erase"], p["write"])
        if args[0].shape[1] == 1:  # decoding: one fused step, no scan set-up
            valid = None if mask is None else mask[:, 0]
            read, new = delta_rule_decode(state, *(a[:, 0] for a in args), valid, backend=self.config.scan_backend)
            return read.unsqueeze(1), new
        return delta_rule(
            *args,
            initial_state=state,
            mask=mask,
            backend=self.config.scan_backend,
            chunk_size=self.config.chunk_size,
        )

    def write_segments(
        self,
        state: torch.Tensor,
        x: torch.Tensor,
        p: dict[str, torch.Tensor],
        mask: torch.Tensor | None,
        segment_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SSW: every token reads the state as it was before this call; then one write per segment, from
        the mean of x over the segment's tokens, segments in increasing id order (ids < 0: no segment)."""
        reads = self.read_only(state, p, mask)
        valid = segment_ids >= 0
        if mask is not None:
            valid = valid & mask
        ids = torch.where(valid, segment_ids, torch.full_like(segment_ids, -1))
        B = x.shape[0]
        uniq = [torch.unique(ids[b][ids[b] >= 0]) for b in range(B)]  # sorted
        n_seg = max((len(u) for u in uniq), default=0)
        if n_seg == 0:
            return reads, state
        rank = torch.full_like(ids, -1)  # per token: position of its segment among the row's segments
        seg_mask = torch.zeros(B, n_seg, dtype=torch.bool, device=x.device)
        for b, u in enumerate(uniq):
            if len(u):
                rank[b] = torch.where(ids[b] >= 0, torch.searchsorted(u, ids[b].clamp_min(0)), rank[b])
                seg_mask[b, : len(u)] = True
        onehot = F.one_hot(rank.clamp_min(0), n_seg).to(torch.float32) * (rank >= 0).unsqueeze(-1).float()
        means = torch.einsum("bts,btd->bsd", onehot, x.float()) / onehot.sum(1).clamp_min(1.0).unsqueeze(-1)
        ps = self.project(means)
        _, new_state = delta_rule(
            ps["q"],
            ps["k"],
            ps["v"],
            ps["keep"],
            ps["erase"],
            ps["write"],
            initial_state=state,
            mask=seg_mask,
            backend=self.config.scan_backend,
            chunk_size=self.config.chunk_size,
        )
        return reads, new_state
