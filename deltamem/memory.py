r"""One δ-mem memory, attached to one attention layer.

x_t is the hidden state entering the attention module (after the decoder layer's input norm).
With H sub-states of rank r (H = 1 except for MSW) and s = α / r:

    q_t = L2norm(tanh(W_q x_t)),  k_t = L2norm(tanh(W_k x_t)),  v_t = W_v x_t      (per sub-state, ∈ R^r)
    β_t = σ(W_β x_t + b_β)  (one per state row; W_β = 0, b_β = −1.5 at init)
    λ_t = 1 − β_t  (coupled)  or  σ(W_λ x_t + b_λ)
    keep, erase, write = (λ, β, β) | (λ, λβ, β) | (1, β, β)        by ``state_update_mode``
    r_t = S_{t−1} q_t                                               (read before write)
    S_t = diag(keep) S_{t−1} − diag(erase)(S_{t−1} k_t) k_tᵀ + diag(write) v_t k_tᵀ
    Δh_t = s · m_h · U_h [r_t^1; …; r_t^H]   for h ∈ branches; Δq/Δk/Δv are added to the q/k/v projections'
                                             outputs (before head reshape, q/k norms and RoPE), Δo after o_proj.

m_h = 1, or with ``trainable_delta_scale`` m_h = m_max · σ(ρ) (ρ = ``delta_scale_raw``, one per layer or
one per branch q, k, v, o). With ``delta_o_rmsnorm``, Δo ← RMSNorm_w(Δo) (weight ``delta_o_rmsnorm_weight``,
applied in the backbone dtype as the reference does).

Precision: by default the memory keeps fp32 master weights whatever ``model.to(dtype)`` does to the
backbone (a cast to a lower-precision float is not applied to them), computes and keeps the state in
fp32, and casts the corrections once to the backbone dtype. ``memory_dtype="backbone"`` lets the weights
follow the backbone's casts and runs projections, state and corrections in that dtype, like the reference
implementation. Parameter names follow the reference (``memory_q_proj``, ``delta_o_proj``, ``beta_bias``, …)
so upstream adapters map one to one.

Two code paths compute the same function. :meth:`DeltaMemLayer.forward` is the lean one used by the hooks:
one matmul for exactly the projections the call needs (read-only: q, plus the gates only when statistics
are asked for; writing: q, k, v, β[, λ] packed), one matmul for all corrections, no host synchronisation
(masks stay on the device; only SSW segment bookkeeping syncs); one token (decoding) goes through
:meth:`DeltaMemLayer._decode`, the same arithmetic laid out for few aten ops (strided views of fresh
tensors, padding folded into q, k and β). :meth:`project`, :meth:`corrections` and
:func:`deltamem.ops.delta_rule.delta_rule_naive` are the plain reference the tests compare it with.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import BRANCHES, DeltaMemConfig
from .ops.delta_rule import delta_rule, delta_rule_decode, resolve_backend
from .ops.delta_rule.step import delta_rule_step_packed, state_matrices


def inverse_bounded_sigmoid(value: float, max_value: float) -> float:
    """ρ with m_max·σ(ρ) = value (clipped to [1e-4, 1 − 1e-4] of m_max, as the reference does)."""
    clipped = min(max(value / max_value, 1e-4), 1.0 - 1e-4)
    return math.log(clipped / (1.0 - clipped))


class FactoredCorrection(NamedTuple):
    """A correction kept as its two factors, Δh = reads · weight ([B·T, H·r] · [H·r, out]), so that the hook
    adds it to the projection's output with one ``addmm_`` (no [B, T, out] tensor written and read back).
    Used at inference only (no autograd, not under compilation), when the output has the compute dtype."""

    reads: torch.Tensor
    weight: torch.Tensor

    def add_to(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` + Δh, in place."""
        if out.is_contiguous() and out.dtype == self.reads.dtype:
            out.view(-1, out.shape[-1]).addmm_(self.reads, self.weight)
            return out
        return out.add_(torch.mm(self.reads, self.weight).view(out.shape).to(out.dtype))


class DeltaMemLayer(nn.Module):
    def __init__(self, config: DeltaMemConfig, attn: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.rank, self.num_substates = config.rank, int(config.num_substates or 1)
        d, n = hidden_size, config.state_dim
        gates = n if config.rankwise_gates else self.num_substates
        self.num_gates = gates
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
        if config.trainable_delta_scale:
            shape = (len(BRANCHES),) if config.delta_scale_granularity == "head" else (1,)
            self.delta_scale_raw = nn.Parameter(torch.empty(shape))
        if config.delta_o_rmsnorm:  # inert (and frozen by attach) without an o branch, as in the reference
            self.delta_o_rmsnorm_weight = nn.Parameter(torch.ones(attn.o_proj.out_features))
        self._sizes = [self.out_features[b] for b in config.branches]
        self._offsets = [sum(self._sizes[:i]) for i in range(len(self._sizes))]
        self._columns_cache: tuple[torch.Tensor, list[torch.Tensor]] | None = None
        self._pack_cache: dict[tuple, tuple[tuple, Any]] = {}
        self._scale_cols: dict[torch.device, torch.Tensor] = {}
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
        if self.config.trainable_delta_scale:
            self.delta_scale_raw.fill_(
                inverse_bounded_sigmoid(self.config.delta_scale_init, self.config.delta_scale_max)
            )
        if self.config.delta_o_rmsnorm:
            self.delta_o_rmsnorm_weight.fill_(1.0)

    def inert_parameters(self) -> list[str]:
        """Names of parameters the configuration never uses (kept for the reference's adapter layout)."""
        return ["delta_o_rmsnorm_weight"] if self.config.delta_o_rmsnorm and "o" not in self.config.branches else []

    def _apply(self, fn, recurse=True):
        """``model.to(torch.bfloat16)`` / ``.half()`` move the memory but leave its master weights in fp32
        (unless ``memory_dtype="backbone"``); device moves and fp32 ↔ fp64 casts apply as usual."""
        self._pack_cache.clear()
        if self.config.memory_dtype == "backbone":
            return super()._apply(fn, recurse)

        def keep_precision(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if (
                isinstance(out, torch.Tensor)
                and t.is_floating_point()
                and out.is_floating_point()
                and out.dtype.itemsize < 4 <= t.dtype.itemsize
            ):  # never below fp32 (fp32 ↔ fp64 casts apply)
                return t.to(device=out.device)
            return out

        return super()._apply(keep_precision, recurse)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.memory_q_proj.dtype

    # --- the plain reference (tests compare the lean path with these) ------------------------------
    def _split(self, x: torch.Tensor) -> torch.Tensor:  # [..., H·r] -> [..., H, r]
        return x.view(*x.shape[:-1], self.num_substates, self.rank)

    def _gate(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(F.linear(x, weight, bias))
        if not self.config.rankwise_gates:  # one scalar per sub-state, shared by its rows
            return g.unsqueeze(-1).expand(*g.shape, self.rank)
        return self._split(g)

    def project(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x [..., d] (any dtype) → q, k, v, keep, erase, write, beta, each [..., H, r] in the compute dtype."""
        x = x.to(self.compute_dtype)
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
        keep, erase = self._keep_erase(beta, lam)
        return {"q": q, "k": k, "v": v, "keep": keep, "erase": erase, "write": beta, "beta": beta}

    def _keep_erase(self, beta: torch.Tensor, lam: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        mode = self.config.state_update_mode
        if mode == "no_lambda":
            return torch.ones_like(beta), beta
        if lam is None:  # coupled λ = 1 − β
            lam = 1.0 - beta
        return (lam, beta) if mode == "standard" else (lam, lam * beta)

    def scale_multiplier(self, branch: str) -> torch.Tensor | float:
        """m_h: 1, or m_max·σ(ρ) with ``trainable_delta_scale``."""
        if not self.config.trainable_delta_scale:
            return 1.0
        raw = self.delta_scale_raw[BRANCHES.index(branch) if self.config.delta_scale_granularity == "head" else 0]
        return torch.sigmoid(raw) * self.config.delta_scale_max

    def corrections(self, reads: torch.Tensor, out_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """reads [B, T, H, r] → {branch: s·m_h·U_h·reads} [B, T, out_features], one matmul per branch (reference).

        ``out_dtype`` (the backbone dtype) is where Δo's RMSNorm runs, as in the reference; the other
        corrections stay in the compute dtype."""
        flat = reads.reshape(*reads.shape[:-2], -1)
        out = {}
        for b in self.config.branches:
            out[b] = F.linear(flat, getattr(self, f"delta_{b}_proj")) * self.config.scale * self.scale_multiplier(b)
        if self.config.delta_o_rmsnorm and "o" in out:
            out["o"] = self._rmsnorm_o(out["o"].to(out_dtype or out["o"].dtype))
        return out

    def _rmsnorm_o(self, delta_o: torch.Tensor) -> torch.Tensor:
        w = self.delta_o_rmsnorm_weight
        dt = torch.promote_types(delta_o.dtype, torch.float32)  # at least fp32, as the reference's .float()
        normed = F.rms_norm(delta_o.to(dt), (delta_o.shape[-1],), weight=w.to(dt), eps=self.config.delta_o_rmsnorm_eps)
        return normed.to(delta_o.dtype)

    @staticmethod
    def read_only(state: torch.Tensor, p: dict[str, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
        reads = torch.einsum("bhij,bthj->bthi", state, p["q"])
        if mask is not None:
            reads = reads * mask[:, :, None, None].to(reads.dtype)
        return reads

    # --- the lean path -----------------------------------------------------------------------------
    def _qk_norm(self, t: torch.Tensor) -> torch.Tensor:
        """L2norm(tanh(t)) over the last dim: F.normalize's arithmetic (t / max(‖t‖, 1e-6)) in 4 ops, not 5."""
        if not self.config.normalize_qk:
            return t
        t = torch.tanh(t)
        return t / torch.linalg.vector_norm(t, dim=-1, keepdim=True).clamp_min(1e-6)

    def _packed_weight(self, names: tuple[str, ...], scale: float = 1.0) -> torch.Tensor:
        """The named weights stacked along the output dimension (times ``scale``). Outside autograd and
        compilation the result is cached until one of the weights changes (tracked by version counters)."""
        ws = [getattr(self, n) for n in names]

        def build() -> torch.Tensor:
            w = ws[0] if len(ws) == 1 else torch.cat(ws)
            return w if scale == 1.0 else w * scale

        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return build()
        key = tuple((w.data_ptr(), w._version, w.device, w.dtype) for w in ws)
        hit = self._pack_cache.get((names, scale))
        if hit is None or hit[0] != key:
            hit = (key, build())
            self._pack_cache[(names, scale)] = hit
        return hit[1]

    def _packed_bias(self, rows: int) -> torch.Tensor:
        """The projection bias for a packed matmul: zeros for the ``rows`` q/k/v rows, then b_β (and b_λ),
        so the gate bias rides in the matmul (as the reference's ``F.linear(x, W_β, b_β)``)."""
        bs = [self.beta_bias] if self.config.couple_lambda else [self.beta_bias, self.lambda_bias]
        if not (torch.is_grad_enabled() or torch.compiler.is_compiling()):
            key = (rows, *((b.data_ptr(), b._version, b.device, b.dtype) for b in bs))
            hit = self._pack_cache.get(("bias", rows))
            if hit is not None and hit[0] == key:
                return hit[1]
        out = torch.cat([bs[0].new_zeros(rows), *bs])
        if not (torch.is_grad_enabled() or torch.compiler.is_compiling()):
            self._pack_cache[("bias", rows)] = (key, out)
        return out

    def _gates(self, g: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """g [..., G(·2)] pre-activations → β, λ (λ None when coupled), each [..., H, r]."""
        G = self.num_gates
        beta = torch.sigmoid(g[..., :G])  # the biases came with the packed matmul
        lam = None if self.config.couple_lambda else torch.sigmoid(g[..., G : 2 * G])
        if self.config.rankwise_gates:
            return beta.view(shape), None if lam is None else lam.view(shape)
        beta = beta.unsqueeze(-1).expand(shape)
        return beta, None if lam is None else lam.unsqueeze(-1).expand(shape)

    @staticmethod
    def _read(state: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """r_t = S q_t for every token: state [B, H, r, r], q [B, T, H, r] → [B, T, H, r] (one bmm)."""
        return torch.matmul(q.transpose(1, 2), state.transpose(-1, -2)).transpose(1, 2)

    def _usable_segments(self, segment_ids: torch.Tensor | None, mask: torch.Tensor | None, B: int, T: int) -> bool:
        """SSW writes segments only with ids covering this call's tokens ([B, T]) of which some are
        valid; otherwise it falls back to one write per token, as the reference does."""
        if segment_ids is None or tuple(segment_ids.shape) != (B, T):
            return False
        valid = segment_ids >= 0
        if mask is not None:
            valid = valid & mask.to(valid.device)
        return bool(valid.any())

    def forward(
        self,
        x: torch.Tensor,
        state: torch.Tensor,
        mask: torch.Tensor | None = None,
        write: bool = False,
        segment_ids: torch.Tensor | None = None,
        stats: bool = False,
        mask_weight: torch.Tensor | None = None,
        state_out: torch.Tensor | None = None,
        factored: bool = False,
    ) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        """One attention call's memory step.

        x [B, T, d] (the attention input, any dtype); state [B, H, r, r]; mask [B, T] bool (True = real
        token) or None; ``mask_weight`` the same mask as 1.0 / 0.0 in the compute dtype, [B, T, 1, 1]
        (the controller passes one per decoder call, shared by its layers; derived from mask when None).
        ``state_out`` (inference, in-place decoding): a [B, H, r, r] buffer of the compute dtype (``state``
        itself may be it) that the one-token lean step writes the new state into and returns; other
        paths ignore it (the caller copies).
        Returns (corrections, new state or None when read-only, mean β per row or None): the corrections are
        one tensor per branch in ``config.branches`` order, [B, T, out_features] in x's dtype, or with
        ``factored`` (inference: the controller's hooks) a :class:`FactoredCorrection` per branch where that
        is the same sum. ``stats`` asks for each row's mean β over its unmasked tokens ([B]; the
        write-sparsity loss needs it); it is skipped otherwise.
        """
        cfg = self.config
        out_dtype = x.dtype
        cdt = self.compute_dtype
        if x.dtype != cdt:
            x = x.to(cdt)
        if state.dtype != cdt:
            state, state_out = state.to(cdt), None
        B, T, _ = x.shape
        H, r, n = self.num_substates, self.rank, cfg.state_dim
        segments = write and cfg.write_mode == "SSW" and self._usable_segments(segment_ids, mask, B, T)
        if T == 1 and not segments:
            if mask is not None and mask_weight is None:
                mask_weight = mask.view(B, 1, 1, 1).to(cdt)
            return self._decode(x, state, mask, mask_weight, write, stats, out_dtype, state_out, factored)
        token_writes = write and not segments
        gates = token_writes or stats
        names = ("memory_q_proj", "memory_k_proj", "memory_v_proj") if token_writes else ("memory_q_proj",)
        if gates:
            names += ("beta_proj",) if cfg.couple_lambda else ("beta_proj", "lambda_proj")
        shape = (B, T, H, r)
        off = 3 * n if token_writes else n
        bias = self._packed_bias(off) if gates else None
        y = F.linear(x, self._packed_weight(names), bias)  # one matmul for all of it
        beta = lam = None
        if gates:
            beta, lam = self._gates(y[..., off:], shape)
        new_state = None
        if token_writes:
            q, k = self._qk_norm(y[..., : 2 * n].view(B, T, 2, H, r)).unbind(2)  # q and k normalised together
            keep, erase = self._keep_erase(beta, lam)
            v = y[..., 2 * n : 3 * n].view(shape)
            reads, new_state = delta_rule(
                q, k, v, keep, erase, beta, initial_state=state, mask=mask, backend=cfg.scan_backend,
                chunk_size=cfg.chunk_size,
            )  # fmt: skip
        else:
            reads = self._read(state, self._qk_norm(y[..., :n].view(shape)))
            if mask is not None:
                reads = torch.where(mask.view(B, T, 1, 1), reads, 0.0)
            if segments:
                new_state = self._write_segment_means(state, x, mask, segment_ids)
        out = self._corrections(reads.reshape(B * T, n), B, T, out_dtype, split=True, factored=factored)
        beta_mean = None
        if stats:
            beta = beta.view(B, T, H, r)
            if mask is None:
                beta_mean = beta.mean((1, 2, 3))
            else:
                w = mask.view(B, T, 1, 1).to(beta.dtype)
                beta_mean = (beta * w).sum((1, 2, 3)) / (w.sum((1, 2, 3)) * H * r).clamp_min(1.0)
        return out, new_state, beta_mean

    def _decode(
        self,
        x: torch.Tensor,
        state: torch.Tensor,
        mask: torch.Tensor | None,
        mask_weight: torch.Tensor | None,
        write: bool,
        stats: bool,
        out_dtype: torch.dtype,
        state_out: torch.Tensor | None = None,
        factored: bool = False,
    ) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        """:meth:`forward` for one token (T = 1, token writes or read-only): the same function in a few
        dozen aten ops. Every operand is a strided view of a fresh tensor (the projection, its
        normalisation, the state products), so no select/split/unsqueeze chains; padding is folded
        into the operands (q = k = 0 and β = 0 for a padded token: read 0, state unchanged), not
        applied with ``where``."""
        cfg = self.config
        B, _, d = x.shape
        H, r, n, G = self.num_substates, self.rank, cfg.state_dim, self.num_gates
        c = 2 if write else 1  # q (and k) per sub-state
        gates = write or stats
        w_t, bias = self._decode_weights(write, gates)
        y = torch.addmm(bias, x.view(B, d), w_t) if gates else torch.mm(x.view(B, d), w_t)
        C = y.shape[1]
        qk = self._qk_norm(y.as_strided((B, H, c, r), (C, c * r, r, 1)))  # [B, H, c, r]
        if not qk.is_contiguous():  # without normalize_qk: still the strided view of y
            qk = qk.contiguous()
        if mask_weight is not None:
            qk = qk * mask_weight
        beta = new_state = None
        if gates:
            off = c * n + (n if write else 0)
            shape, stride = (B, H, r, 1), ((C, r, 1, 1) if cfg.rankwise_gates else (C, 1, 0, 1))
            beta = torch.sigmoid(y.as_strided(shape, stride, off))  # [B, H, r, 1]: one value per row
        if not write:
            # r_t = S q_t, computed as q_tᵀ Sᵀ (the orientation of the multi-token read)
            reads = torch.bmm(qk.view(B * H, 1, r), state_matrices(state).transpose(1, 2)).view(B, n)
        else:
            lam = None if cfg.couple_lambda else torch.sigmoid(y.as_strided(shape, stride, off + G))
            v = y.as_strided(shape, (C, r, 1, 1), c * n)
            if resolve_backend(cfg.scan_backend, x) == "chunk":
                mode = cfg.state_update_mode
                wb = beta if mask_weight is None else beta * mask_weight  # padded: β = 0 (erase = write = 0)
                if mode == "no_lambda":
                    lam = None
                elif lam is None:  # coupled: λ = 1 − β (= 1 when padded)
                    lam = torch.sub(self._one(wb), wb)
                elif mask is not None:  # padded: λ = 1
                    lam = torch.where(mask.view(B, 1, 1, 1), lam, self._one(lam))
                erase = lam * wb if mode == "lambda_outside" else wb
                reads, new_state = delta_rule_step_packed(state, qk, v, lam, erase, wb, out=state_out)
            else:  # the reference step (naive) or the fused launch (CUDA), with the mask as given
                keep, erase = self._keep_erase(beta, lam)
                read, new_state = delta_rule_decode(
                    state, qk[:, :, 0], qk[:, :, 1], v[..., 0], keep[..., 0], erase[..., 0], beta[..., 0],
                    None if mask is None else mask.view(B), backend=cfg.scan_backend,
                )  # fmt: skip
                reads = read.reshape(B, n)
        out = self._corrections(reads, B, 1, out_dtype, factored=factored)
        beta_mean = None
        if stats:
            if mask_weight is None:
                beta_mean = beta.mean((1, 2, 3))
            else:
                valid = mask_weight.sum((1, 2, 3)) * H * r
                beta_mean = (beta * mask_weight).sum((1, 2, 3)) / valid.clamp_min(1.0)
        return out, new_state, beta_mean

    def _corrections(
        self,
        reads: torch.Tensor,
        B: int,
        T: int,
        out_dtype: torch.dtype,
        split: bool = False,
        factored: bool = False,
    ) -> list[Any]:
        """reads [B·T, H·r] → one correction per branch [B, T, out_features] in ``out_dtype``: one matmul
        with the packed s·U (s scales the small weight rather than the [B, T, Σ out] product: one large
        tensor fewer, and bit-identical to s·(U r) for a power-of-two s, the default α/r = 2), one cast.
        The branches are ``split`` (training-friendly backward) or taken as strided views (one op each).
        ``factored``: (reads, column slice of (s·U)ᵀ) per branch instead, which the hook adds with one
        ``addmm_`` — when no cast and no RMSNorm of Δo stands between the product and the addition."""
        cfg = self.config
        wt = self._correction_weight_t()
        if factored and out_dtype == reads.dtype and not (cfg.delta_o_rmsnorm and "o" in cfg.branches):
            hit = self._columns_cache
            if hit is None or hit[0] is not wt:  # the per-branch column views of the (cached) packed weight
                pairs = zip(self._offsets, self._sizes, strict=True)
                hit = self._columns_cache = (wt, [wt[:, o : o + n] for o, n in pairs])
            return [FactoredCorrection(reads, cols) for cols in hit[1]]
        corr = torch.mm(reads, wt)
        if corr.dtype != out_dtype:
            corr = corr.to(out_dtype)  # the one cast, for all branches
        sizes = self._sizes
        total = sum(sizes)
        if len(sizes) == 1:
            out = [corr.view(B, T, total)]
        elif split:
            out = list(corr.view(B, T, total).split(sizes, dim=-1))
        else:
            offsets = [sum(sizes[:i]) for i in range(len(sizes))]
            out = [corr.as_strided((B, T, s), (T * total, total, 1), o) for s, o in zip(sizes, offsets, strict=True)]
        if cfg.delta_o_rmsnorm and "o" in cfg.branches:
            i = cfg.branches.index("o")
            out[i] = self._rmsnorm_o(out[i])
        return out

    def _cached(self, key: tuple, tensors: list[torch.Tensor], build) -> Any:
        """``build()``, cached until one of ``tensors`` changes (version counters); built afresh under
        autograd or compilation."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return build()
        ver = tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in tensors)
        hit = self._pack_cache.get(key)
        if hit is None or hit[0] != ver:
            hit = self._pack_cache[key] = (ver, build())
        return hit[1]

    def _one(self, like: torch.Tensor) -> torch.Tensor:
        """A 0-dim 1 (``sub(one, β)`` is one op; ``1.0 − β`` wraps the scalar first: several)."""
        return self._cached(("one", like.device, like.dtype), [], lambda: like.new_ones(()))

    def _decode_weights(self, write: bool, gates: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(Wᵀ, bias [1, C]) of the one-token projection: rows q (read-only) or, per sub-state, q_h then
        k_h, then v (writing), then the gates; the bias is zero but for the gates' b_β (b_λ). Wᵀ is a
        transposed view (what ``F.linear`` hands ``addmm``), kept with the cache."""
        cfg = self.config
        H, r = self.num_substates, self.rank
        ws = ["memory_q_proj", "memory_k_proj", "memory_v_proj"] if write else ["memory_q_proj"]
        gs = (["beta_proj"] if cfg.couple_lambda else ["beta_proj", "lambda_proj"]) if gates else []
        bs = [g.replace("proj", "bias") for g in gs]
        tensors = [getattr(self, name) for name in ws + gs + bs]

        def build() -> tuple[torch.Tensor, torch.Tensor | None]:
            q = self.memory_q_proj
            rows = [q]
            if write:
                d = q.shape[1]
                qk = torch.stack((q.view(H, r, d), self.memory_k_proj.view(H, r, d)), 1).view(2 * H * r, d)
                rows = [qk, self.memory_v_proj]
            rows += [getattr(self, g) for g in gs]
            w = rows[0] if len(rows) == 1 else torch.cat(rows)
            if not gates:
                return w.t(), None
            gb = [getattr(self, b) for b in bs]
            zeros = gb[0].new_zeros(w.shape[0] - sum(b.shape[0] for b in gb))
            return w.t(), torch.cat([zeros, *gb]).unsqueeze(0)

        return self._cached(("decode", write, gates), tensors, build)

    def _correction_weight_t(self) -> torch.Tensor:
        """(s·m·U)ᵀ [H·r, Σ out] for every branch, packed (a transposed view, cached)."""
        cfg = self.config
        names = tuple(f"delta_{b}_proj" for b in cfg.branches)
        tensors = [getattr(self, name) for name in names]
        if cfg.trainable_delta_scale:
            tensors.append(self.delta_scale_raw)

        def build() -> torch.Tensor:
            u = self._packed_weight(names, cfg.scale)  # s·U
            if cfg.trainable_delta_scale:
                u = u * self._scale_columns().unsqueeze(-1)  # m_h per output row of U, on the small weight
            return u.t()

        return self._cached(("corrections",), tensors, build)

    def _scale_columns(self) -> torch.Tensor:
        """m_h per output column of the packed corrections (a scalar per layer, or one per branch)."""
        m = torch.sigmoid(self.delta_scale_raw) * self.config.delta_scale_max
        if self.config.delta_scale_granularity != "head":
            return m
        cols = self._scale_cols.get(m.device)
        if cols is None:  # per output column, the index of its branch in (q, k, v, o); built once per device
            idx = [
                BRANCHES.index(b)
                for b, size in zip(self.config.branches, self._sizes, strict=True)
                for _ in range(size)
            ]
            cols = self._scale_cols[m.device] = torch.tensor(idx, device=m.device)
        return m[cols]

    # --- SSW -----------------------------------------------------------------------------------------
    def write_tokens(
        self, state: torch.Tensor, p: dict[str, torch.Tensor], mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """TSW/MSW through the scan dispatcher (reference form). Returns (reads, new state)."""
        return delta_rule(
            p["q"], p["k"], p["v"], p["keep"], p["erase"], p["write"], initial_state=state, mask=mask,
            backend=self.config.scan_backend, chunk_size=self.config.chunk_size,
        )  # fmt: skip

    def _write_segment_means(
        self, state: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None, segment_ids: torch.Tensor
    ) -> torch.Tensor:
        """SSW: one write per segment, from the mean of x over the segment's tokens, segments in increasing
        id order (ids < 0: no segment). Every token of the call reads the state as it was before."""
        valid = segment_ids >= 0
        if mask is not None:
            valid = valid & mask
        ids = torch.where(valid, segment_ids, torch.full_like(segment_ids, -1))
        B = x.shape[0]
        uniq = [torch.unique(ids[b][ids[b] >= 0]) for b in range(B)]  # sorted
        n_seg = max((len(u) for u in uniq), default=0)
        if n_seg == 0:
            return state
        rank = torch.full_like(ids, -1)  # per token: position of its segment among the row's segments
        seg_mask = torch.zeros(B, n_seg, dtype=torch.bool, device=x.device)
        for b, u in enumerate(uniq):
            if len(u):
                rank[b] = torch.where(ids[b] >= 0, torch.searchsorted(u, ids[b].clamp_min(0)), rank[b])
                seg_mask[b, : len(u)] = True
        onehot = F.one_hot(rank.clamp_min(0), n_seg).to(x.dtype) * (rank >= 0).unsqueeze(-1).to(x.dtype)
        means = torch.einsum("bts,btd->bsd", onehot, x) / onehot.sum(1).clamp_min(1.0).unsqueeze(-1)
        ps = self.project(means)
        _, new_state = delta_rule(
            ps["q"], ps["k"], ps["v"], ps["keep"], ps["erase"], ps["write"], initial_state=state, mask=seg_mask,
            backend=self.config.scan_backend, chunk_size=self.config.chunk_size,
        )  # fmt: skip
        return new_state

    def write_segments(
        self,
        state: torch.Tensor,
        x: torch.Tensor,
        p: dict[str, torch.Tensor],
        mask: torch.Tensor | None,
        segment_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SSW (reference form): reads before the call's writes, then the segment-mean writes."""
        return self.read_only(state, p, mask), self._write_segment_means(
            state, x.to(self.compute_dtype), mask, segment_ids
        )
