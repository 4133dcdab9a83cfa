"""Which Hugging Face decoders δ-mem can attach to, and how to find their attention modules.

Every supported family keeps its attention in ``<decoder>.layers[i].self_attn`` with separate
``q_proj``/``k_proj``/``v_proj``/``o_proj`` linear layers, which is all the hooks in
:mod:`deltamem.attach` need: corrections are added to those projections' outputs, so the backbone's
own attention code (eager, SDPA, flash-attention, KV caching, Qwen3's q/k norms, SmolLM3's NoPE layers)
runs untouched. A family with fused QKV projections (e.g. Phi-3) would need its own entry here.
"""

from __future__ import annotations

from torch import nn

from .embedded import EMBEDDED_NAMES, load_embedded

# model_type → human name; all share the layout described above.
SUPPORTED_MODEL_TYPES = {
    "llama": "Llama / SmolLM2",
    "qwen3": "Qwen3",
    "smollm3": "SmolLM3",
    "mistral": "Mistral",
    "qwen2": "Qwen2 / Qwen2.5",
}

__all__ = ["EMBEDDED_NAMES", "SUPPORTED_MODEL_TYPES", "find_attention_layers", "load_backbone", "load_embedded"]


def _decoder(model: nn.Module) -> nn.Module:
    for cand in (getattr(model, "model", None), model):
        if cand is not None and isinstance(getattr(cand, "layers", None), nn.ModuleList):
            return cand
    raise ValueError(f"{type(model).__name__}: no decoder with a `layers` ModuleList found")


def find_attention_layers(model: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """Return (decoder module, [attention module of each decoder layer]) or raise a clear error."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_MODEL_TYPES.items())
        raise ValueError(f"δ-mem does not support model_type={model_type!r}; supported: {supported}")
    decoder = _decoder(model)
    attns = []
    for i, layer in enumerate(decoder.layers):
        attn = getattr(layer, "self_attn", None)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not isinstance(getattr(attn, name, None), nn.Linear):
                raise ValueError(f"{model_type}: layer {i} has no self_attn.{name} linear layer")
        attns.append(attn)
    return decoder, attns


def load_backbone(name_or_path: str, dtype=None, attn_implementation: str | None = None, **kwargs):
    """(model, tokenizer) for a hub id / local folder, or the offline embedded backbone ("embedded").

    ``trust_remote_code`` stays off unless passed explicitly.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path in EMBEDDED_NAMES:
        return load_embedded(dtype=dtype or torch.float32, attn_implementation=attn_implementation)
    kwargs.setdefault("trust_remote_code", False)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=kwargs["trust_remote_code"])
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype or "auto", **extra, **kwargs)
    return model.eval(), tok
