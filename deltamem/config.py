"""`DeltaMemConfig`: every knob of the δ-mem mechanism, validated, with a JSON round-trip.

Defaults are the paper's released runs (rank 8, α = 16, Q/O branches, token-level writes, coupled
rank-wise gates, ``base_slice_fixed`` output init with gain 0.05). See ``SPEC.md`` in the project docs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

BRANCHES = ("q", "k", "v", "o")
WRITE_MODES = ("TSW", "SSW", "MSW")
STATE_UPDATE_MODES = ("standard", "lambda_outside", "no_lambda")
OUTPUT_INITS = ("base_slice_fixed", "zero")
SCAN_BACKENDS = ("auto", "naive", "chunk", "fused")
SEGMENT_GRANULARITIES = ("message", "sentence")
DELTA_SCALE_GRANULARITIES = ("layer", "head")
MEMORY_DTYPES = ("float32", "backbone")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"DeltaMemConfig.{name}={value!r} is invalid; allowed values: {', '.join(allowed)}")


@dataclass(frozen=True)
class DeltaMemConfig:
    """δ-mem hyper-parameters.

    rank: r, the side of each r×r state (and the width of the memory q/k/v projections).
    alpha: correction scale numerator; corrections are scaled by s = alpha / rank.
    branches: which attention projections receive a correction Δh = s·U_h·r_t (subset of q, k, v, o).
    write_mode: TSW (a write per token), SSW (a write per segment, from the mean hidden state of its
        tokens; segment ids come with the input) or MSW (``num_substates`` parallel r×r states, token writes).
        SSW without usable ids for a call (none given, not [B, T] of that call, or all < 0 / padding)
        writes one update per token instead, as the reference implementation does; so does every token
        ``generate(memory_write=True)`` produces.
    num_substates: H, the number of sub-states (MSW only; the paper uses 4). None → 4 for MSW, else 1.
    couple_lambda: retention λ = 1 − β (True) or its own gate σ(W_λ x + b_λ).
    rankwise_gates: one gate per state row (True) or one scalar gate per token.
    state_update_mode: keep/erase/write coefficients: standard (λ, β, β), lambda_outside (λ, λβ, β),
        no_lambda (1, β, β).
    normalize_qk: memory q/k = L2norm(tanh(·)).
    beta_bias_init: b_β at init (W_β = 0), so β starts at σ(−1.5) ≈ 0.18.
    target_layers: decoder layer indices to attach to; None = all layers.
    output_init: base_slice_fixed (U[:, :w] = gain·colnorm(W_base[:, :w]), w = min(8, r); the paper's
        runs) or zero (an attached model is exactly the backbone whatever is written).
    online_gain: g in the base_slice_fixed init.
    scan_backend / chunk_size: which delta-rule implementation runs the writes (see ``deltamem.ops``).
    segment_granularity: what an SSW segment is: a message (upstream ``message_mean``) or a sentence of a
        message (upstream ``sentence_mean``; ids from :func:`deltamem.segmentation.sentence_segment_ids`).
        The layer's arithmetic is the same; only how segment ids are made differs.
    trainable_delta_scale: every correction is multiplied by m = delta_scale_max·σ(ρ), ρ a trained
        parameter ``delta_scale_raw`` (one per layer, or one per branch q, k, v, o with
        ``delta_scale_granularity="head"``) initialised so that m = delta_scale_init (the reference's
        ``alpha_over_rank`` parameterisation: s·m).
    delta_o_rmsnorm: Δo ← RMSNorm(Δo) with a trained weight ``delta_o_rmsnorm_weight`` (eps
        ``delta_o_rmsnorm_eps``), in the backbone dtype. Without "o" in branches the weight exists but
        is inert and frozen, as in the reference (whose adapters then still carry it).
    memory_dtype: float32 (default: fp32 master weights and state whatever the backbone's dtype) or
        backbone (weights follow ``model.to(dtype)``, the memory runs in the backbone dtype like the
        reference implementation; for bit-level comparisons with it).
    """

    rank: int = 8
    alpha: float = 16.0
    branches: tuple[str, ...] = ("q", "o")
    write_mode: str = "TSW"
    num_substates: int | None = None
    couple_lambda: bool = True
    rankwise_gates: bool = True
    state_update_mode: str = "standard"
    normalize_qk: bool = True
    beta_bias_init: float = -1.5
    target_layers: tuple[int, ...] | None = None
    output_init: str = "base_slice_fixed"
    online_gain: float = 0.05
    base_slice_width: int = 8
    scan_backend: str = "auto"
    chunk_size: int = 16
    segment_granularity: str = "message"
    trainable_delta_scale: bool = False
    delta_scale_init: float = 1.0
    delta_scale_max: float = 2.0
    delta_scale_granularity: str = "layer"
    delta_o_rmsnorm: bool = False
    delta_o_rmsnorm_eps: float = 1e-6
    memory_dtype: str = "float32"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if isinstance(self.branches, str):
            set_(self, "branches", tuple(b.strip() for b in self.branches.split(",") if b.strip()))
        branches = tuple(dict.fromkeys(self.branches))  # de-duplicated, order kept
        bad = [b for b in branches if b not in BRANCHES]
        if bad or not branches:
            raise ValueError(
                f"DeltaMemConfig.branches={self.branches!r} is invalid; allowed: a non-empty subset of "
                f"{', '.join(BRANCHES)}"
            )
        set_(self, "branches", branches)
        if isinstance(self.write_mode, str):
            set_(self, "write_mode", self.write_mode.upper())
        _choice("write_mode", self.write_mode, WRITE_MODES)
        _choice("state_update_mode", self.state_update_mode, STATE_UPDATE_MODES)
        _choice("output_init", self.output_init, OUTPUT_INITS)
        _choice("scan_backend", self.scan_backend, SCAN_BACKENDS)
        _choice("segment_granularity", self.segment_granularity, SEGMENT_GRANULARITIES)
        _choice("delta_scale_granularity", self.delta_scale_granularity, DELTA_SCALE_GRANULARITIES)
        _choice("memory_dtype", self.memory_dtype, MEMORY_DTYPES)
        if self.segment_granularity == "sentence" and self.write_mode != "SSW":
            raise ValueError(
                f"DeltaMemConfig.segment_granularity='sentence' needs write_mode='SSW' (got {self.write_mode!r})"
            )
        if not 0 < self.delta_scale_init < self.delta_scale_max:
            raise ValueError(
                f"DeltaMemConfig.delta_scale_init={self.delta_scale_init!r} / delta_scale_max="
                f"{self.delta_scale_max!r} are invalid; expected 0 < delta_scale_init < delta_scale_max"
            )
        if not self.delta_o_rmsnorm_eps > 0:
            raise ValueError(f"DeltaMemConfig.delta_o_rmsnorm_eps={self.delta_o_rmsnorm_eps!r}; expected > 0")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"DeltaMemConfig.rank={self.rank!r} is invalid; expected an integer >= 1")
        if not self.alpha > 0:
            raise ValueError(f"DeltaMemConfig.alpha={self.alpha!r} is invalid; expected a number > 0")
        if self.num_substates is None:
            set_(self, "num_substates", 4 if self.write_mode == "MSW" else 1)
        n = self.num_substates
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"DeltaMemConfig.num_substates={n!r} is invalid; expected an integer >= 1")
        if self.write_mode != "MSW" and n != 1:
            raise ValueError(
                f"DeltaMemConfig.num_substates={n} is only allowed with write_mode='MSW' "
                f"(got write_mode={self.write_mode!r}); allowed for TSW/SSW: 1"
            )
        if self.target_layers is not None:
            layers = tuple(int(i) for i in self.target_layers)
            if not layers or any(i < 0 for i in layers) or len(set(layers)) != len(layers):
                raise ValueError(
                    f"DeltaMemConfig.target_layers={self.target_layers!r} is invalid; expected None (all "
                    "layers) or distinct non-negative layer indices"
                )
            set_(self, "target_layers", tuple(sorted(layers)))
        if self.base_slice_width < 1:
            raise ValueError(f"DeltaMemConfig.base_slice_width={self.base_slice_width!r}; expected >= 1")
        if self.chunk_size < 1:
            raise ValueError(f"DeltaMemConfig.chunk_size={self.chunk_size!r}; expected >= 1")
        if not self.online_gain >= 0:
            raise ValueError(f"DeltaMemConfig.online_gain={self.online_gain!r}; expected >= 0")

    @property
    def scale(self) -> float:
        """s = α / r, the factor on every correction."""
        return self.alpha / self.rank

    @property
    def state_dim(self) -> int:
        """H·r: width of the memory projections and of the concatenated reads."""
        return self.rank * int(self.num_substates or 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields. Options added after the first release are left out while at their defaults,
        so the saved config (and whatever hashes it) of an adapter that does not use them is unchanged."""
        d = asdict(self)
        d["branches"] = list(self.branches)
        d["target_layers"] = None if self.target_layers is None else list(self.target_layers)
        defaults = {f.name: f.default for f in fields(self)}
        for name in _OMIT_IF_DEFAULT:
            if d[name] == defaults[name]:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeltaMemConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"DeltaMemConfig: unknown field(s) {unknown}; known fields: {sorted(known)}")
        d = dict(data)
        if isinstance(d.get("branches"), list):
            d["branches"] = tuple(d["branches"])
        if isinstance(d.get("target_layers"), list):
            d["target_layers"] = tuple(d["target_layers"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DeltaMemConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_upstream(cls, data: dict[str, Any]) -> DeltaMemConfig:
        """Map the reference implementation's ``delta_mem_config.json`` fields onto ours.

        Options of the reference that change the arithmetic and that we do not implement are refused by
        name (field, value, what is supported); the rest carries over one to one.
        """
        unsupported = []
        for name, allowed in _UPSTREAM_FIXED.items():
            if name in data and _norm(data[name]) != _norm(allowed):
                unsupported.append(f"{name}={data[name]!r} (supported: {allowed!r})")
        if unsupported:
            raise ValueError(
                "delta_mem_config.json: unsupported option(s) of the reference implementation: "
                + "; ".join(unsupported)
            )
        granularity = str(data.get("memory_write_granularity", "token")).lower()
        heads = int(data.get("num_state_heads", 1))
        if granularity in ("message_mean", "sentence_mean"):
            mode = "SSW"
        elif granularity == "token":
            mode = "MSW" if heads > 1 else "TSW"
        else:
            raise ValueError(
                f"delta_mem_config.json: memory_write_granularity={granularity!r} is not supported; "
                "allowed: token, message_mean, sentence_mean"
            )
        if mode == "SSW" and heads != 1:
            raise ValueError(
                f"delta_mem_config.json: memory_write_granularity={granularity!r} with num_state_heads={heads} "
                "is not supported (segment writes use one state: num_state_heads=1)"
            )
        heads_field = data.get("delta_heads", BRANCHES)
        if isinstance(heads_field, str):
            heads_field = [h.strip() for h in heads_field.split(",") if h.strip()]
        init = str(data.get("output_init", "zero"))
        layers = data.get("target_layers") or None
        branches = tuple(str(h).lower() for h in heads_field)
        return cls(
            rank=int(data.get("rank", 8)),
            alpha=float(data.get("alpha", 16.0)),
            branches=branches,
            write_mode=mode,
            num_substates=heads,
            couple_lambda=bool(data.get("couple_lambda", True)),
            rankwise_gates=bool(data.get("rankwise_gates", True)),
            state_update_mode=str(data.get("state_update_mode", "standard")),
            normalize_qk=bool(data.get("normalize_qk", True)),
            beta_bias_init=float(data.get("beta_bias_init", -1.5)),
            target_layers=tuple(layers) if layers else None,
            # imported weights replace the init; keep the closest of our two inits for the record
            output_init="zero" if init == "zero" else "base_slice_fixed",
            online_gain=float(data.get("online_gain", 0.05)),
            base_slice_width=int(data.get("base_slice_ref_width", 8)),
            segment_granularity="sentence" if granularity == "sentence_mean" else "message",
            trainable_delta_scale=bool(data.get("trainable_delta_scale", False)),
            delta_scale_init=float(data.get("delta_scale_init", 1.0)),
            delta_scale_max=float(data.get("delta_scale_max", 2.0)),
            delta_scale_granularity=str(data.get("delta_scale_granularity", "layer")).strip().lower(),
            # without an active o branch the reference keeps (and saves) an inert weight: so do we
            delta_o_rmsnorm=bool(data.get("delta_o_rmsnorm", False)),
            delta_o_rmsnorm_eps=float(data.get("delta_o_rmsnorm_eps", 1e-6)),
        )


_OMIT_IF_DEFAULT = (
    "segment_granularity",
    "trainable_delta_scale",
    "delta_scale_init",
    "delta_scale_max",
    "delta_scale_granularity",
    "delta_o_rmsnorm",
    "delta_o_rmsnorm_eps",
    "memory_dtype",
)


def _norm(value: Any) -> Any:
    """Compare JSON lists and tuples alike; strings case-insensitively."""
    if isinstance(value, (list, tuple)):
        return tuple(_norm(v) for v in value)
    return value.strip().lower() if isinstance(value, str) else value


# Reference options whose non-default values change the mechanism and are not implemented here.
_UPSTREAM_FIXED: dict[str, Any] = {
    "num_memory_partitions": 1,
    "num_global_memory_partitions": 0,
    "memory_readout_mode": "delta",
    "memory_write_source": "learned_hidden",
    "memory_reader_layers": [],
    "latent_memory_layers": [],
    "target_modules": ["self_attn"],
    "delta_scale_parameterization": "alpha_over_rank",
}
