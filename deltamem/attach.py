"""`attach_delta_mem`: give a frozen Hugging Face decoder a δ-mem memory, without touching its code.

How it hooks in (per target layer ℓ, see :mod:`deltamem.memory` for the equations):

* a forward pre-hook on ``self_attn`` sees x (the normed hidden state), reads the active state
  (and, when writing, runs the delta-rule scan and stores the new state), and leaves the corrections;
* forward hooks on ``q_proj``/``k_proj``/``v_proj`` add Δq/Δk/Δv to their outputs (so the backbone's own
  head reshape, q/k norms, RoPE and attention kernel follow), and on ``o_proj`` add Δo;
* a pre-hook on the decoder captures the 2-D ``attention_mask`` so padding tokens neither read nor write.

With no active memory state every hook is a no-op: the model *is* the backbone. The state is activated
per call: ``model(..., memory=state)``, ``model.generate(..., memory=state, memory_write=False)``,
``model.write_memory(ids)``; or with ``with model.delta_mem.use(state, write=...):``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .backbones import find_attention_layers
from .config import DeltaMemConfig
from .memory import DeltaMemLayer, FactoredCorrection
from .state import MemoryState

MEMORY_KWARGS = ("memory", "memory_write", "segment_ids", "memory_inplace")


def backbone_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Shape facts plus two weight statistics, to refuse an adapter trained on another backbone."""
    cfg = model.config
    _, attns = find_attention_layers(model)
    q = attns[0].q_proj.weight.detach().float()
    return {
        "model_type": cfg.model_type,
        "name_or_path": getattr(cfg, "_name_or_path", ""),
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": len(attns),
        "q_out": attns[0].q_proj.out_features,
        "kv_out": attns[0].k_proj.out_features,
        "o_in": attns[0].o_proj.in_features,
        "vocab_size": getattr(cfg, "vocab_size", None),
        "layer0_q_mean_abs": float(q.abs().mean()),
        "layer0_q_std": float(q.std()),
    }


def cache_kwarg(module: nn.Module) -> str:
    """The KV-cache keyword of a transformers forward: ``cache`` (transformers ≥ 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


class DeltaMemController:
    """The memories of one model and the per-call context (active state, write switch, masks)."""

    def __init__(self, model: nn.Module, config: DeltaMemConfig) -> None:
        self.config = config
        self.decoder, attns = find_attention_layers(model)
        n = len(attns)
        targets = list(range(n)) if config.target_layers is None else list(config.target_layers)
        if targets and max(targets) >= n:
            raise ValueError(f"DeltaMemConfig.target_layers={targets} but the backbone has {n} layers (0..{n - 1})")
        self.fingerprint = backbone_fingerprint(model)
        hidden = self.fingerprint["hidden_size"]
        self.attns = {i: attns[i] for i in targets}
        self.layers: dict[int, DeltaMemLayer] = {}
        for i, attn in self.attns.items():
            w = attn.q_proj.weight
            layer = DeltaMemLayer(config, attn, hidden).to(device=w.device)  # fp32 master weights
            if config.memory_dtype == "backbone":
                layer = layer.to(dtype=w.dtype)
            attn.delta_mem = layer  # registered as a child: moves with .to(), saved in state_dict
            self.layers[i] = layer
        self.state: MemoryState | None = None
        self.write = False
        self.inplace = False
        self.segment_ids: torch.Tensor | None = None
        self.attention_mask: torch.Tensor | None = None
        # None: record the mean β (for beta_sparsity_loss) only when autograd is on, i.e. in training
        self.record_stats: bool | None = None
        self.beta_means: dict[int, torch.Tensor] = {}  # per layer: each row's mean β over the last call's tokens [B]
        self._pending: dict[int, dict[str, torch.Tensor] | None] = {}
        self._mask_cache: tuple[Any, int, int, torch.Tensor | None] | None = None
        self._mask_weight_cache: tuple[torch.Tensor, torch.dtype, torch.Tensor] | None = None
        self._handles: list[Any] = []
        self._checkpointed: dict[int, nn.Module] = {}
        self._install_hooks()

    # --- context ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def use(
        self,
        state: MemoryState | None,
        write: bool = False,
        segment_ids: torch.Tensor | None = None,
        inplace: bool = False,
    ) -> Iterator[MemoryState | None]:
        """Activate ``state`` for the calls inside the block; ``write`` switches the delta-rule writes on.

        ``inplace=True`` (inference) writes each new state into the existing per-layer tensors
        (``copy_``) instead of replacing them, so their addresses stay fixed: what a captured CUDA graph
        needs. The state must then already have the input's batch size and device.
        """
        if state is not None:
            missing = sorted(set(self.layers) - set(state.layers))
            if missing:
                raise ValueError(f"memory state has no tensor for attached layer(s) {missing}")
        saved = (self.state, self.write, self.segment_ids, self.inplace)
        self.state, self.write, self.segment_ids, self.inplace = state, write, segment_ids, inplace
        try:
            yield state
        finally:
            self.state, self.write, self.segment_ids, self.inplace = saved
            self._pending.clear()

    def new_state(self, batch_size: int = 1, device: torch.device | str | None = None) -> MemoryState:
        first = next(iter(self.layers.values()))
        return MemoryState.zeros(
            list(self.layers),
            batch_size,
            first.num_substates,
            first.rank,
            device or first.memory_q_proj.device,
            dtype=first.compute_dtype,
        )

    # --- hooks -----------------------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        self._handles.append(self.decoder.register_forward_pre_hook(self._capture_mask, with_kwargs=True))
        for i, attn in self.attns.items():
            self._handles.append(
                attn.register_forward_pre_hook(functools.partial(self._memory_step, i), with_kwargs=True)
            )
            for branch in self.config.branches:  # no hook (and no call overhead) on other projections
                proj = getattr(attn, f"{branch}_proj")
                hook = functools.partial(self._add_correction, i, branch)
                self._handles.append(proj.register_forward_hook(hook))

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _capture_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]
        self.attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _token_mask(self, batch: int, length: int) -> torch.Tensor | None:
        """This call's [B, T] bool token mask, computed once per decoder call (all layers share it) and
        kept on the device: no ``mask.all()`` host sync; an all-ones mask costs a few cheap ops."""
        m = self.attention_mask
        if m is None or m.shape[0] != batch or m.shape[1] < length:
            return None
        c = self._mask_cache
        if c is not None and c[0] is m and c[1] == batch and c[2] == length:
            return c[3]
        tm = m[:, -length:]
        if tm.dtype != torch.bool:
            tm = tm.bool()
        self._mask_cache = (m, batch, length, tm)
        return tm

    def _mask_weight(self, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """The token mask as 1.0 / 0.0 [B, T, 1, 1] in ``dtype``, once per decoder call (all layers share it):
        the layers fold it into their operands with one multiply."""
        if mask is None:
            return None
        c = self._mask_weight_cache
        if c is not None and c[0] is mask and c[1] == dtype:
            return c[2]
        w = mask.to(dtype).view(*mask.shape, 1, 1)
        self._mask_weight_cache = (mask, dtype, w)
        return w

    def _memory_step(self, idx: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        state = self.state
        if state is None:
            self._pending[idx] = None
            return
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        B, T, _ = x.shape
        layer = self.layers[idx]
        S = state.layers[idx]
        if S.shape[0] != B:
            if self.inplace and self.write:
                raise ValueError(
                    f"inplace=True writes into the state's own tensors: its batch size {S.shape[0]} must equal "
                    f"the input batch size {B} (expand it first: state.expand({B}))"
                )
            S = S.expand(B, *S.shape[1:]) if S.shape[0] == 1 else S
            if S.shape[0] != B:
                raise ValueError(f"memory state batch size {S.shape[0]} does not match the input batch size {B}")
        if S.device != x.device:
            S = S.to(x.device)
        stats = torch.is_grad_enabled() if self.record_stats is None else self.record_stats
        seg = self.segment_ids
        if seg is not None and seg.device != x.device:
            seg = seg.to(x.device)
        mask = self._token_mask(B, T)
        buf = state.layers[idx]
        # in-place decoding: the lean step writes straight into the state's own tensor (no copy after)
        out = buf if self.inplace and self.write and S is buf and not torch.is_grad_enabled() else None
        # inference: corrections as factors, each added by the hook with one addmm_ (see FactoredCorrection)
        factored = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        corr, new, beta_mean = layer(
            x, S, mask, self.write, seg, stats, self._mask_weight(mask, layer.compute_dtype), state_out=out,
            factored=factored,
        )  # fmt: skip
        if new is not None:
            if self.inplace and new is not buf:
                buf.copy_(new)
            else:
                state.layers[idx] = new
        if beta_mean is not None:
            self.beta_means[idx] = beta_mean
        else:
            self.beta_means.pop(idx, None)
        self._pending[idx] = dict(zip(self.config.branches, corr, strict=True))

    def _add_correction(self, idx: int, branch: str, module: nn.Module, args: tuple, out: torch.Tensor):
        pending = self._pending.get(idx)
        if not pending or branch not in pending:
            return None
        delta = pending[branch]
        if branch == "o":
            self._pending[idx] = None  # o_proj is the last projection of this attention call
        if isinstance(delta, FactoredCorrection):
            return delta.add_to(out)
        # in place: the projection's output is a fresh tensor that its own backward does not need
        return out.add_(delta)

    # --- gradient checkpointing ------------------------------------------------------------------------
    @property
    def gradient_checkpointing(self) -> bool:
        return bool(self._checkpointed)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute every decoder layer during backward instead of storing its activations.

        For long writes (the paper's 8192 tokens) the stored activations of the frozen backbone dominate
        training memory. A plain recomputing checkpoint would be wrong here, because δ-mem's hooks write
        the state during the forward: the replay would start from the already-updated state. So each layer
        ℓ is checkpointed as a pure function of its state,

            (h_out, S_out) = checkpoint(f_ℓ, h_in, S_in),

        with the call's context (write switch, segment ids, mask) captured at call time: the replay starts
        from S_in and leaves the live state untouched. Calls that carry a KV cache are not checkpointed
        (a replay would append to the cache twice); training passes ``use_cache=False``. Do not combine
        with Hugging Face's own ``gradient_checkpointing_enable()``.
        """
        if self._checkpointed:
            return
        if getattr(self.decoder, "gradient_checkpointing", False):
            raise ValueError(
                "the backbone has Hugging Face gradient checkpointing enabled; it would replay δ-mem's state "
                "writes. Disable it (model.gradient_checkpointing_disable()) and use this method instead."
            )
        for i, layer in enumerate(self.decoder.layers):
            layer.forward = functools.partial(self._checkpointed_layer, i, layer.forward)
            self._checkpointed[i] = layer

    def disable_gradient_checkpointing(self) -> None:
        for layer in self._checkpointed.values():
            layer.__dict__.pop("forward", None)
        self._checkpointed.clear()

    def _checkpointed_layer(self, idx: int, orig: Any, *args: Any, **kwargs: Any) -> Any:
        has_cache = any(kwargs.get(k) is not None for k in ("cache", "past_key_values", "past_key_value"))
        if not torch.is_grad_enabled() or has_cache:
            return orig(*args, **kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        rest = args[1:]
        ctx = (self.state, self.write, self.segment_ids, self.attention_mask)
        has_state = ctx[0] is not None and idx in self.layers

        def layer_fn(h: torch.Tensor, s: torch.Tensor | None) -> tuple[Any, torch.Tensor | None]:
            saved = (self.state, self.write, self.segment_ids, self.attention_mask)
            state = ctx[0]
            if has_state:  # a private copy: the replay must not touch the live state
                state = MemoryState(dict(ctx[0].layers))
                state.layers[idx] = s
            self.state, self.write, self.segment_ids, self.attention_mask = state, ctx[1], ctx[2], ctx[3]
            try:
                out = orig(h, *rest, **kwargs)
                return out, (state.layers[idx] if has_state else None)
            finally:
                self.state, self.write, self.segment_ids, self.attention_mask = saved

        from torch.utils.checkpoint import checkpoint

        out, s_out = checkpoint(layer_fn, hidden, ctx[0].layers[idx] if has_state else None, use_reentrant=False)
        if has_state:
            ctx[0].layers[idx] = s_out
        return out

    # --- parameters ------------------------------------------------------------------------------------
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for i, layer in self.layers.items():
            for name, p in layer.named_parameters():
                yield f"layers.{i}.{name}", p

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    def beta_sparsity_loss(self, target: float = 0.05) -> torch.Tensor:
        """The paper's write-sparsity term, per episode: mean over layers ℓ and batch rows e of
        (β̄_{e,ℓ} − target)², β̄_{e,ℓ} the mean β of row e's unmasked tokens in the last call. With one episode
        per row, this is each episode's term averaged over the batch (for batch 1 the paper's term)."""
        if not self.beta_means:
            raise RuntimeError(
                "no β recorded: run a forward pass with a memory state first, with autograd on (training) "
                "or with model.delta_mem.record_stats = True"
            )
        return torch.stack([(b - target) ** 2 for b in self.beta_means.values()]).mean()


def attach_delta_mem(model: nn.Module, config: DeltaMemConfig | None = None) -> nn.Module:
    """Attach δ-mem to ``model`` in place and return it.

    Freezes every backbone parameter; adds ``model.delta_mem`` (the controller) and the methods
    ``write_memory``, ``new_memory``, ``save_adapter``; wraps ``forward`` and ``generate`` so they accept
    ``memory=``, ``memory_write=``, ``segment_ids=`` and ``memory_inplace=`` (write the state into its own
    tensors, for CUDA graphs; see docs/PERFORMANCE.md).
    """
    config = config or DeltaMemConfig()
    if getattr(model, "delta_mem", None) is not None:
        raise ValueError("this model already has δ-mem attached (use detach_delta_mem first)")
    for p in model.parameters():
        p.requires_grad_(False)
    controller = DeltaMemController(model, config)
    model.delta_mem = controller
    inert = {f"layers.{i}.{n}" for i, layer in controller.layers.items() for n in layer.inert_parameters()}
    for name, p in controller.named_parameters():
        p.requires_grad_(name not in inert)

    orig_forward = model.forward
    orig_generate = model.generate

    @functools.wraps(orig_forward)
    def forward(*args, **kwargs):
        memory, write, seg, inplace = (kwargs.pop(k, None) for k in MEMORY_KWARGS)
        if memory is None:
            if write or seg is not None:
                raise ValueError("memory_write/segment_ids given without memory=<MemoryState>")
            return orig_forward(*args, **kwargs)
        with controller.use(memory, bool(write), seg, bool(inplace)):
            return orig_forward(*args, **kwargs)

    @functools.wraps(orig_generate)
    def generate(*args, **kwargs):
        # SSW with writes: the prompt is written by segments when segment_ids cover it, every generated
        # token (no ids for it) is written as a token, as the reference does
        memory, write, seg, inplace = (kwargs.pop(k, None) for k in MEMORY_KWARGS)
        if memory is None:
            return orig_generate(*args, **kwargs)
        with controller.use(memory, bool(write), seg, bool(inplace)):
            return orig_generate(*args, **kwargs)

    model.forward = forward
    model.generate = generate
    model._deltamem_originals = (orig_forward, orig_generate)
    model.write_memory = types.MethodType(write_memory, model)
    model.new_memory = types.MethodType(lambda self, batch_size=1: controller.new_state(batch_size), model)

    def _save(self, path: str) -> None:
        from .adapter import save_adapter

        save_adapter(self, path)

    model.save_adapter = types.MethodType(_save, model)
    return model


def detach_delta_mem(model: nn.Module) -> nn.Module:
    """Remove hooks, memories and wrappers: gives back the plain backbone (still frozen)."""
    controller: DeltaMemController | None = getattr(model, "delta_mem", None)
    if controller is None:
        return model
    controller.remove_hooks()
    for attn in controller.attns.values():
        del attn.delta_mem
    for name in ("forward", "generate", "write_memory", "new_memory", "save_adapter", "_deltamem_originals"):
        model.__dict__.pop(name, None)
    del model.delta_mem
    return model


def write_memory(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    state: MemoryState | None = None,
    keep_cache: bool = False,
) -> MemoryState:
    """Write a history into a memory state (a fresh one, or ``state`` to append) and return it.

    Runs the backbone's decoder (no LM head) over ``input_ids`` [B, T] with writes on. Gradients flow
    unless called under ``torch.no_grad()``. With ``keep_cache=True`` the KV cache is kept in the state,
    so a later append attends to and continues after everything written before (one-pass equivalent);
    otherwise each call starts at position 0 and sees only its own tokens (as in online chat).
    """
    controller: DeltaMemController = model.delta_mem
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if segment_ids is not None and segment_ids.dim() == 1:
        segment_ids = segment_ids.unsqueeze(0)
    if state is None:
        state = controller.new_state(input_ids.shape[0], device=input_ids.device)
    elif state.batch_size != input_ids.shape[0]:
        state.layers.update(state.expand(input_ids.shape[0]).layers)
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": keep_cache}
    if keep_cache:
        if state.cache is None:
            from transformers import DynamicCache

            state.cache = DynamicCache(config=model.config)
        kwargs[cache_kwarg(controller.decoder)] = state.cache
        if attention_mask is not None and attention_mask.shape[1] != state.seen_tokens + input_ids.shape[1]:
            raise ValueError(
                "with keep_cache=True, attention_mask must cover the cached tokens too: expected length "
                f"{state.seen_tokens + input_ids.shape[1]}, got {attention_mask.shape[1]}"
            )
    if attention_mask is not None:  # padded rows: positions count real tokens only (as generate() does)
        positions = attention_mask.long().cumsum(-1) - 1
        kwargs["position_ids"] = positions.clamp_min(0)[:, -input_ids.shape[1] :]
    with controller.use(state, write=True, segment_ids=segment_ids):
        controller.decoder(**kwargs)
    return state
