r"""Triton kernels for the δ-mem delta rule: chunk-parallel scan (forward + backward) and a fused decode step.

The rule and the shapes are those of :mod:`deltamem.ops.delta_rule.naive`. Every state row i is an
independent scalar-gated delta rule (key size r, value size 1), and one token is the affine map

    s_i ← M_i s_i + c_i v_i k,      M_i = a_i I − b_i k kᵀ      (a = keep, b = erase, c = write)

so a chunk of C tokens is also an affine map of its start row, ``s_end = P_i s_start + o_i`` with
``P_i = M_C ⋯ M_1`` (r×r per row) and ``o_i`` the chunk's end row started from zero.

Design (version 1: a two-level scan, *not* the intra-chunk WY/UT form of :mod:`chunk`)
------------------------------------------------------------------------------------------
Forward, three launches:

1. ``_chunk_maps_fwd``  grid (B·H, N, row blocks): per chunk, P and o by running the C token maps in
   registers (independent of the state, so all chunks run in parallel);
2. ``_affine_scan``      grid (B·H, row blocks): the only sequential part, N = ⌈T/C⌉ steps
   ``s ← P s + o``; stores every chunk-start state (the checkpoints) and the final state;
3. ``_chunk_reads_fwd``  grid (B·H, N): reads, replaying each chunk token by token from its start state.

Backward (a ``torch.autograd.Function``), three launches, no per-token state kept from the forward:

1. ``_chunk_adj_bwd``   per chunk, the adjoint at the chunk start caused by the chunk's own reads alone
   (the adjoint obeys g ← M_iᵀ g + dr_i q with M_i symmetric, which needs no states);
2. ``_affine_scan``     reversed and transposed (g ← Pᵀ g + d): adjoints at every chunk end; its last
   value is the gradient of the initial state;
3. ``_chunk_grads_bwd`` per chunk, from its start state (checkpoint) and its end adjoint: replays the
   states of a sub-block of ``SUB`` tokens into a register array [SUB, r, r], then walks it backwards
   for the per-token gradients. With ``SUB < C`` the states of earlier sub-blocks are recomputed from
   the chunk start (≈ C/(2·SUB) extra token steps each); SUB·r² is kept ≤ 4096 values.

Sequential depth ≈ 2C + T/C steps forward (C ≈ √T by default) instead of T, and the intra-chunk work is
per-token (r² per token and row block, r³ per token for the chunk maps), which is cheap at r ≤ 16. All
loops are ``tl.range(..., num_stages=_STAGES)``: their loads do not depend on the carried state, so the
software pipeliner prefetches them (cp.async) a few iterations ahead and a token step does not wait a
full memory latency. Memory kept for the backward: the inputs, one r×r state per chunk and the chunk
maps (r³/C values per token and sub-state, 4 at r = 8 and C = 128).
The WY/UT form would replace the in-chunk token loops by triangular solves and matmuls; it is left for
a later version once the GPU numbers show where the time goes.

Small r: no ``tl.dot`` anywhere. The r×r tiles (r ∈ {4, 8, 16, 32}, all powers of two) are contracted
with broadcast-and-sum (``tl.sum(x[:, None] * y[None, :], axis)``). ``tl.dot`` needs every dim ≥ 16, and
padding r = 8 to 16 would waste 4× the work on tiles that are latency-bound anyway; the per-row gates
also make the in-chunk operators row-dependent, so they are batched [r, ·, ·] contractions, not one
matmul. The r³ tiles (chunk maps) are split into row blocks of ≤ 4096 values, which only matters at r = 32.

Precision: computed in float32 (float64 when the inputs or the state are float64, e.g. in tests); the
state is kept in its own dtype (float32 when not given). Reads come out in
``torch.promote_types(q.dtype, state.dtype)``, gradients in each input's dtype.

CPU: only under ``TRITON_INTERPRET=1`` (slow, for tests), which must be set before triton is first
imported: ``triton.jit`` decides at decoration time, for these kernels and for triton's own ``tl.*``
helpers. :func:`compile_kernels` compiles everything
for an H100 (sm_90) without a GPU, to catch what the interpreter does not. No autotuning: one fixed
launch config per shape (``num_warps`` from the tile size), which also keeps the interpreter happy.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

__all__ = [
    "compile_kernels",
    "default_chunk_size",
    "default_replay_size",
    "delta_rule_fused",
    "delta_rule_step_fused",
    "interpreted",
]

_TILE = 4096  # max values in a register tile (r³ row blocks, [SUB, r, r] replay buffers)
# loop software-pipelining depth: the per-token loads do not depend on the state, so Triton prefetches
# them this many iterations ahead (cp.async); without it every token step waits a full memory latency
_STAGES = 4


# ----------------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _load_token(
    q_ptr,
    k_ptr,
    v_ptr,
    a_ptr,
    e_ptr,
    w_ptr,
    m_ptr,
    b,
    t,
    h,
    T,
    H,
    rows,
    cols,
    R: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """q, k over key dims (``cols``); v and the gates over state rows (``rows``). Padding → identity step."""
    base = ((b * T + t) * H + h) * R
    q = tl.load(q_ptr + base + cols).to(DTYPE)
    k = tl.load(k_ptr + base + cols).to(DTYPE)
    v = tl.load(v_ptr + base + rows).to(DTYPE)
    a = tl.load(a_ptr + base + rows).to(DTYPE)
    e = tl.load(e_ptr + base + rows).to(DTYPE)
    w = tl.load(w_ptr + base + rows).to(DTYPE)
    if HAS_MASK:
        valid = tl.load(m_ptr + b * T + t) != 0
    else:
        valid = t >= 0  # a true scalar, so both branches give the same types
    a = tl.where(valid, a, 1.0)
    e = tl.where(valid, e, 0.0)
    w = tl.where(valid, w, 0.0)
    return q, k, v, a, e, w, valid


@triton.jit
def _state_step(S, k, v, a, e, w):
    """One write of the rule on a [rows, r] state tile: S ← diag(a) S + (w v − e (S k)) kᵀ."""
    sk = tl.sum(S * k[None, :], axis=1)
    return a[:, None] * S + (w * v - e * sk)[:, None] * k[None, :]


# ----------------------------------------------------------------------------------------------------
# forward kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _chunk_maps_fwd(
    q_ptr,
    k_ptr,
    v_ptr,
    a_ptr,
    e_ptr,
    w_ptr,
    m_ptr,
    P_ptr,
    O_ptr,
    T,
    H,
    N,
    CHUNK,
    R: tl.constexpr,
    ROWS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DTYPE: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Per chunk and row block: transfer P [ROWS, r, r] and offset o [ROWS, r] of the chunk's affine map."""
    bh = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(2) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, R)
    b = bh // H
    h = bh % H
    eye = (cols[:, None] == cols[None, :]).to(DTYPE)
    P = tl.zeros([ROWS, R, R], dtype=DTYPE) + eye[None, :, :]  # P[i, e, d]: s_end[i, e] += P s_start[i, d]
    o = tl.zeros([ROWS, R], dtype=DTYPE)
    t0 = n * CHUNK
    n_tok = tl.minimum(CHUNK, T - t0)
    for j in tl.range(0, n_tok, num_stages=STAGES):
        _q, k, v, a, e, w, _valid = _load_token(
            q_ptr,
            k_ptr,
            v_ptr,
            a_ptr,
            e_ptr,
            w_ptr,
            m_ptr,
            b,
            t0 + j,
            h,
            T,
            H,
            rows,
            cols,
            R,
            HAS_MASK,
            DTYPE,
        )
        kP = tl.sum(k[None, :, None] * P, axis=1)  # kᵀ P_i, [ROWS, r]
        P = a[:, None, None] * P - (e[:, None] * kP)[:, None, :] * k[None, :, None]
        o = _state_step(o, k, v, a, e, w)
    tile = (bh * N + n) * R + rows
    tl.store(P_ptr + tile[:, None, None] * R * R + cols[None, :, None] * R + cols[None, None, :], P)
    tl.store(O_ptr + tile[:, None] * R + cols[None, :], o)


@triton.jit
def _affine_scan(
    P_ptr,
    O_ptr,
    X0_ptr,
    X_ptr,
    N,
    R: tl.constexpr,
    ROWS: tl.constexpr,
    REVERSE: tl.constexpr,
    DTYPE: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Sequential over chunks. Forward: x_{n+1} = P_n x_n + o_n, X[n] = x_n (X has N + 1 entries).

    REVERSE (the adjoint): x_n = P_nᵀ x_{n+1} + o_n from x_N = X0, again X[n] = x_n.
    """
    bh = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, R)
    off2 = rows[:, None] * R + cols[None, :]
    off3 = rows[:, None, None] * R * R + cols[None, :, None] * R + cols[None, None, :]
    x = tl.load(X0_ptr + bh * R * R + off2).to(DTYPE)
    for i in tl.range(0, N, num_stages=STAGES):  # the pipeliner prefetches the next maps
        if REVERSE:
            n = N - 1 - i
            tl.store(X_ptr + (bh * (N + 1) + n + 1) * R * R + off2, x)
        else:
            n = i
            tl.store(X_ptr + (bh * (N + 1) + n) * R * R + off2, x)
        P = tl.load(P_ptr + (bh * N + n) * R * R * R + off3)
        o = tl.load(O_ptr + (bh * N + n) * R * R + off2)
        if REVERSE:
            x = tl.sum(P * x[:, :, None], axis=1) + o
        else:
            x = tl.sum(P * x[:, None, :], axis=2) + o
    if REVERSE:
        tl.store(X_ptr + bh * (N + 1) * R * R + off2, x)
    else:
        tl.store(X_ptr + (bh * (N + 1) + N) * R * R + off2, x)


@triton.jit
def _chunk_reads_fwd(
    q_ptr,
    k_ptr,
    v_ptr,
    a_ptr,
    e_ptr,
    w_ptr,
    m_ptr,
    S_ptr,
    r_ptr,
    T,
    H,
    N,
    CHUNK,
    R: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DTYPE: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Reads of one chunk, replayed token by token from its start state (read before write)."""
    bh = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64)
    idx = tl.arange(0, R)
    b = bh // H
    h = bh % H
    S = tl.load(S_ptr + (bh * (N + 1) + n) * R * R + idx[:, None] * R + idx[None, :])
    t0 = n * CHUNK
    n_tok = tl.minimum(CHUNK, T - t0)
    for j in tl.range(0, n_tok, num_stages=STAGES):
        t = t0 + j
        q, k, v, a, e, w, valid = _load_token(
            q_ptr, k_ptr, v_ptr, a_ptr, e_ptr, w_ptr, m_ptr, b, t, h, T, H, idx, idx, R, HAS_MASK, DTYPE
        )
        read = tl.where(valid, tl.sum(S * q[None, :], axis=1), 0.0)
        tl.store(r_ptr + ((b * T + t) * H + h) * R + idx, read.to(r_ptr.dtype.element_ty))
        S = _state_step(S, k, v, a, e, w)  # padding: a = 1, e = w = 0, so S is unchanged


# ----------------------------------------------------------------------------------------------------
# backward kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _chunk_adj_bwd(
    q_ptr,
    k_ptr,
    a_ptr,
    e_ptr,
    m_ptr,
    dr_ptr,
    D_ptr,
    T,
    H,
    N,
    CHUNK,
    R: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DTYPE: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Adjoint at a chunk's start from its own reads only: g ← diag(a) g − diag(e) (g k) kᵀ + dr qᵀ, reversed."""
    bh = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64)
    idx = tl.arange(0, R)
    b = bh // H
    h = bh % H
    g = tl.zeros([R, R], dtype=DTYPE)
    t0 = n * CHUNK
    n_tok = tl.minimum(CHUNK, T - t0)
    for jj in tl.range(0, n_tok, num_stages=STAGES):
        t = t0 + n_tok - 1 - jj
        base = ((b * T + t) * H + h) * R
        q = tl.load(q_ptr + base + idx).to(DTYPE)
        k = tl.load(k_ptr + base + idx).to(DTYPE)
        a = tl.load(a_ptr + base + idx).to(DTYPE)
        e = tl.load(e_ptr + base + idx).to(DTYPE)
        dr = tl.load(dr_ptr + base + idx).to(DTYPE)
        if HAS_MASK:
            valid = tl.load(m_ptr + b * T + t) != 0
            a = tl.where(valid, a, 1.0)
            e = tl.where(valid, e, 0.0)
            dr = tl.where(valid, dr, 0.0)
        gk = tl.sum(g * k[None, :], axis=1)
        g = a[:, None] * g - (e * gk)[:, None] * k[None, :] + dr[:, None] * q[None, :]
    tl.store(D_ptr + (bh * N + n) * R * R + idx[:, None] * R + idx[None, :], g)


@triton.jit
def _chunk_grads_bwd(
    q_ptr,
    k_ptr,
    v_ptr,
    a_ptr,
    e_ptr,
    w_ptr,
    m_ptr,
    dr_ptr,
    S_ptr,
    G_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    da_ptr,
    de_ptr,
    dw_ptr,
    T,
    H,
    N,
    CHUNK,
    R: tl.constexpr,
    SUB: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DTYPE: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Per-token gradients of one chunk from its start state S[n] and its end adjoint G[n + 1]."""
    bh = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64)
    idx = tl.arange(0, R)
    slot = tl.arange(0, SUB)
    b = bh // H
    h = bh % H
    off2 = idx[:, None] * R + idx[None, :]
    G = tl.load(G_ptr + (bh * (N + 1) + n + 1) * R * R + off2).to(DTYPE)
    t0 = n * CHUNK
    n_tok = tl.minimum(CHUNK, T - t0)
    n_sub = tl.cdiv(n_tok, SUB)
    for sbi in range(0, n_sub):
        sb = n_sub - 1 - sbi
        ts = t0 + sb * SUB  # first token of this sub-block
        S = tl.load(S_ptr + (bh * (N + 1) + n) * R * R + off2).to(DTYPE)
        # recompute the state at the sub-block start (no iterations when SUB >= CHUNK)
        for j in tl.range(0, sb * SUB, num_stages=STAGES):
            _q, k, v, a, e, w, _valid = _load_token(
                q_ptr,
                k_ptr,
                v_ptr,
                a_ptr,
                e_ptr,
                w_ptr,
                m_ptr,
                b,
                t0 + j,
                h,
                T,
                H,
                idx,
                idx,
                R,
                HAS_MASK,
                DTYPE,
            )
            S = _state_step(S, k, v, a, e, w)
        sb_len = tl.minimum(SUB, n_tok - sb * SUB)
        buf = tl.zeros([SUB, R, R], dtype=DTYPE)  # buf[j] = state before token ts + j
        for j in tl.range(0, sb_len, num_stages=STAGES):
            _q, k, v, a, e, w, _valid = _load_token(
                q_ptr,
                k_ptr,
                v_ptr,
                a_ptr,
                e_ptr,
                w_ptr,
                m_ptr,
                b,
                ts + j,
                h,
                T,
                H,
                idx,
                idx,
                R,
                HAS_MASK,
                DTYPE,
            )
            buf = tl.where((slot == j)[:, None, None], S[None, :, :], buf)
            S = _state_step(S, k, v, a, e, w)
        for jj in tl.range(0, sb_len, num_stages=STAGES):
            j = sb_len - 1 - jj
            t = ts + j
            q, k, v, a, e, w, valid = _load_token(
                q_ptr,
                k_ptr,
                v_ptr,
                a_ptr,
                e_ptr,
                w_ptr,
                m_ptr,
                b,
                t,
                h,
                T,
                H,
                idx,
                idx,
                R,
                HAS_MASK,
                DTYPE,
            )
            base = ((b * T + t) * H + h) * R
            dr = tl.where(valid, tl.load(dr_ptr + base + idx).to(DTYPE), 0.0)
            Sp = tl.sum(tl.where((slot == j)[:, None, None], buf, 0.0), axis=0)  # S_{t-1}
            sk = tl.sum(Sp * k[None, :], axis=1)
            coef = w * v - e * sk  # what this token wrote, per row
            dcoef = tl.sum(G * k[None, :], axis=1)
            dsk = -e * dcoef
            fv = tl.where(valid, 1.0, 0.0)  # padding gets zero gradients
            tl.store(da_ptr + base + idx, (fv * tl.sum(G * Sp, axis=1)).to(da_ptr.dtype.element_ty))
            tl.store(dw_ptr + base + idx, (fv * dcoef * v).to(dw_ptr.dtype.element_ty))
            tl.store(dv_ptr + base + idx, (fv * dcoef * w).to(dv_ptr.dtype.element_ty))
            tl.store(de_ptr + base + idx, (-fv * dcoef * sk).to(de_ptr.dtype.element_ty))
            dk = tl.sum(coef[:, None] * G + dsk[:, None] * Sp, axis=0)
            tl.store(dk_ptr + base + idx, (fv * dk).to(dk_ptr.dtype.element_ty))
            tl.store(dq_ptr + base + idx, tl.sum(dr[:, None] * Sp, axis=0).to(dq_ptr.dtype.element_ty))
            G_prev = a[:, None] * G + dsk[:, None] * k[None, :] + dr[:, None] * q[None, :]
            G = tl.where(valid, G_prev, G)


# ----------------------------------------------------------------------------------------------------
# decode
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _decode_step(
    S_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    a_ptr,
    e_ptr,
    w_ptr,
    m_ptr,
    r_ptr,
    out_ptr,
    H,
    R: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """One token for one (b, h): read then write, state loaded and stored once."""
    bh = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, R)
    off2 = idx[:, None] * R + idx[None, :]
    S_in = tl.load(S_ptr + bh * R * R + off2)
    S = S_in.to(DTYPE)
    base = bh * R
    q = tl.load(q_ptr + base + idx).to(DTYPE)
    k = tl.load(k_ptr + base + idx).to(DTYPE)
    v = tl.load(v_ptr + base + idx).to(DTYPE)
    a = tl.load(a_ptr + base + idx).to(DTYPE)
    e = tl.load(e_ptr + base + idx).to(DTYPE)
    w = tl.load(w_ptr + base + idx).to(DTYPE)
    read = tl.sum(S * q[None, :], axis=1)
    S_new = _state_step(S, k, v, a, e, w)
    if HAS_MASK:
        valid = tl.load(m_ptr + bh // H) != 0
        read = tl.where(valid, read, 0.0)
        S_new = tl.where(valid, S_new, S)
    tl.store(r_ptr + base + idx, read.to(r_ptr.dtype.element_ty))
    tl.store(out_ptr + bh * R * R + off2, S_new.to(out_ptr.dtype.element_ty))


# ----------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------

_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}
_KERNELS = {
    "maps": _chunk_maps_fwd,
    "scan": _affine_scan,
    "reads": _chunk_reads_fwd,
    "adjoint": _chunk_adj_bwd,
    "scan_T": _affine_scan,
    "grads": _chunk_grads_bwd,
    "decode": _decode_step,
}


def default_chunk_size(T: int) -> int:
    """≈ √T (a power of two in [16, 256]): balances the in-chunk replays against the sequential scan."""
    return min(256, max(16, triton.next_power_of_2(math.isqrt(max(T, 1)))))


def default_replay_size(chunk: int, r: int) -> int:
    """The backward replay sub-block: the whole chunk if [chunk, r, r] fits in ``_TILE`` values."""
    return max(1, min(triton.next_power_of_2(chunk), _TILE // (r * r)))


def _rows(r: int) -> int:  # state rows per program in the r³ kernels (r = 32: 4 rows of 32×32)
    return min(r, max(1, _TILE // (r * r)))


def _warps(elems: int) -> int:  # tiles are tiny: 1 warp up to 1024 values, at most 4
    return max(1, min(4, elems // 1024))


def _meta(name: str, r: int, dtype: tl.dtype, has_mask: bool, sub: int = 1) -> dict[str, object]:
    """Compile-time arguments and ``num_warps`` of each kernel; shared by the launches and AOT checks."""
    rows = _rows(r)
    if name in ("scan", "scan_T"):
        meta = dict(
            R=r, ROWS=rows, REVERSE=name == "scan_T", DTYPE=dtype, STAGES=_STAGES, num_warps=_warps(rows * r * r)
        )
    elif name == "maps":
        meta = dict(R=r, ROWS=rows, HAS_MASK=has_mask, DTYPE=dtype, STAGES=_STAGES, num_warps=_warps(rows * r * r))
    elif name == "grads":
        meta = dict(R=r, SUB=sub, HAS_MASK=has_mask, DTYPE=dtype, STAGES=_STAGES, num_warps=_warps(sub * r * r))
    elif name == "decode":
        meta = dict(R=r, HAS_MASK=has_mask, DTYPE=dtype, num_warps=1)
    else:  # reads, adjoint
        meta = dict(R=r, HAS_MASK=has_mask, DTYPE=dtype, STAGES=_STAGES, num_warps=_warps(r * r))
    return meta


def interpreted() -> bool:
    """Whether this module's kernels were decorated under ``TRITON_INTERPRET=1`` (Python, CPU tensors)."""
    return not isinstance(_affine_scan, triton.runtime.JITFunction)


def compile_kernels(r: int, *, arch: int = 90, fp64: bool = False, has_mask: bool = True) -> dict[str, object]:
    """Compile every kernel for an NVIDIA target (``arch`` 90 = H100) without a GPU; {name: CompiledKernel}.

    Catches what the interpreter cannot: unsupported ops, type errors in loops, shapes the GPU backend
    rejects. Not available under ``TRITON_INTERPRET=1`` (the kernels are then Python functions).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    _check_r(r)
    if interpreted():
        raise RuntimeError("compile_kernels needs the compiled kernels: import without TRITON_INTERPRET=1")
    dtype, ptr = (tl.float64, "*fp64") if fp64 else (tl.float32, "*fp32")
    out: dict[str, object] = {}
    for name, kernel in _KERNELS.items():
        meta = _meta(name, r, dtype, has_mask, sub=default_replay_size(256, r))
        warps = meta.pop("num_warps")
        sig = {
            a: "constexpr" if a in meta else "*i8" if a == "m_ptr" else ptr if a.endswith("_ptr") else "i32"
            for a in kernel.arg_names
        }
        src = ASTSource(fn=kernel, signature=sig, constexprs=meta)
        out[name] = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    return out


def _check_r(r: int) -> None:
    if r < 2 or r & (r - 1) or r > 64:
        raise ValueError(f"the fused delta rule needs r a power of two in [2, 64], got r={r}")


def _on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' one (no-op on CPU)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


class _DeltaRuleFused(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        keep: torch.Tensor,
        erase: torch.Tensor,
        write: torch.Tensor,
        state0: torch.Tensor,
        mask: torch.Tensor | None,
        chunk: int,
        sub: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, H, R = q.shape
        cdt = _compute_dtype(q, state0)
        dt, rows, has_mask = _TL_DTYPE[cdt], _rows(R), mask is not None
        m = mask if has_mask else q  # dummy pointer, never read
        N = triton.cdiv(T, chunk)
        P = q.new_empty(B * H, N, R, R, R, dtype=cdt)  # chunk transfer maps, per row
        O = q.new_empty(B * H, N, R, R, dtype=cdt)  # chunk offsets
        tokens = (q, k, v, keep, erase, write, m)
        _chunk_maps_fwd[(B * H, N, R // rows)](*tokens, P, O, T, H, N, chunk, **_meta("maps", R, dt, has_mask))
        S = q.new_empty(B * H, N + 1, R, R, dtype=cdt)  # chunk-start states, then the final state
        _affine_scan[(B * H, R // rows)](P, O, state0, S, N, **_meta("scan", R, dt, has_mask))
        reads = q.new_empty(B, T, H, R, dtype=torch.promote_types(q.dtype, state0.dtype))
        _chunk_reads_fwd[(B * H, N)](*tokens, S, reads, T, H, N, chunk, **_meta("reads", R, dt, has_mask))
        final = S[:, N].reshape(B, H, R, R).to(state0.dtype, copy=True)  # not a view of a saved buffer
        ctx.save_for_backward(q, k, v, keep, erase, write, mask, S, P)
        ctx.chunk, ctx.sub, ctx.state_dtype = chunk, sub, state0.dtype
        return reads, final

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, d_reads: torch.Tensor, d_final: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        q, k, v, keep, erase, write, mask, S, P = ctx.saved_tensors
        chunk, sub = ctx.chunk, ctx.sub
        B, T, H, R = q.shape
        N = S.shape[1] - 1
        cdt = S.dtype
        dt, rows, has_mask = _TL_DTYPE[cdt], _rows(R), mask is not None
        m = mask if has_mask else q
        d_reads = d_reads.contiguous()
        D = q.new_empty(B * H, N, R, R, dtype=cdt)  # per-chunk adjoint offsets
        _chunk_adj_bwd[(B * H, N)](
            q, k, keep, erase, m, d_reads, D, T, H, N, chunk, **_meta("adjoint", R, dt, has_mask)
        )
        G = q.new_empty(B * H, N + 1, R, R, dtype=cdt)  # adjoints at the chunk boundaries
        g_final = d_final.to(cdt).contiguous()
        _affine_scan[(B * H, R // rows)](P, D, g_final, G, N, **_meta("scan_T", R, dt, has_mask))
        grads = [torch.empty_like(x) for x in (q, k, v, keep, erase, write)]
        _chunk_grads_bwd[(B * H, N)](
            q, k, v, keep, erase, write, m, d_reads, S, G, *grads, T, H, N, chunk,
            **_meta("grads", R, dt, has_mask, sub=sub),
        )  # fmt: skip
        d_state0 = G[:, 0].reshape(B, H, R, R).to(ctx.state_dtype)
        return (*grads, d_state0, None, None, None)


def delta_rule_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    erase: torch.Tensor,
    write: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    replay_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton scan. Returns ``(reads [B, T, H, r], final_state [B, H, r, r])``, equal to the naive loop.

    ``chunk_size``: tokens per chunk (default :func:`default_chunk_size`); any positive int works.
    ``replay_size``: tokens per backward replay sub-block, a power of two (default
    :func:`default_replay_size`). Differentiable in q, k, v, keep, erase, write and ``initial_state``.
    """
    B, T, H, R = q.shape
    _check_r(R)
    for name, x in (("k", k), ("v", v), ("keep", keep), ("erase", erase), ("write", write)):
        if x.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(x.shape)}")
    if mask is not None and mask.shape != (B, T):
        raise ValueError(f"mask must be [B, T] = {(B, T)}, got {tuple(mask.shape)}")
    state_dtype = initial_state.dtype if initial_state is not None else _compute_dtype(q)
    if initial_state is None:
        initial_state = q.new_zeros(B, H, R, R, dtype=state_dtype)
    if T == 0:
        return q.new_zeros(B, 0, H, R, dtype=torch.promote_types(q.dtype, state_dtype)), initial_state
    chunk = int(chunk_size) if chunk_size is not None else default_chunk_size(T)
    chunk = max(chunk, triton.cdiv(T, 65535))  # N chunks is a grid dimension: CUDA caps it at 65535
    sub = int(replay_size) if replay_size is not None else default_replay_size(chunk, R)
    if chunk < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk}")
    if sub < 1 or sub & (sub - 1):
        raise ValueError(f"replay_size must be a power of two, got {sub}")
    q, k, v, keep, erase, write = (x.contiguous() for x in (q, k, v, keep, erase, write))
    m = mask.to(torch.int8).contiguous() if mask is not None else None
    with _on_device(q):
        return _DeltaRuleFused.apply(q, k, v, keep, erase, write, initial_state.contiguous(), m, chunk, sub)


def delta_rule_step_fused(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    erase: torch.Tensor,
    write: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode token in one launch; same contract as :func:`naive.delta_rule_step`.

    ``state`` [B, H, r, r], the rest [B, H, r], ``valid`` [B] bool. Returns (read, new state). Inference
    only: when autograd needs gradients through it, it falls back to the (differentiable) PyTorch step.
    """
    if torch.is_grad_enabled() and any(x.requires_grad for x in (state, q, k, v, keep, erase, write)):
        from .naive import delta_rule_step

        return delta_rule_step(state, q, k, v, keep, erase, write, valid)
    B, H, R = q.shape
    _check_r(R)
    if state.shape != (B, H, R, R):
        raise ValueError(f"state must be [B, H, r, r] = {(B, H, R, R)}, got {tuple(state.shape)}")
    state = state.contiguous()
    q, k, v, keep, erase, write = (x.contiguous() for x in (q, k, v, keep, erase, write))
    has_mask = valid is not None
    m = valid.to(torch.int8).contiguous() if valid is not None else q
    read = q.new_empty(B, H, R, dtype=torch.promote_types(q.dtype, state.dtype))
    new_state = torch.empty_like(state)
    dt = _TL_DTYPE[_compute_dtype(q, state)]
    with _on_device(q):
        _decode_step[(B * H,)](
            state, q, k, v, keep, erase, write, m, read, new_state, H, **_meta("decode", R, dt, has_mask)
        )
    return read, new_state
