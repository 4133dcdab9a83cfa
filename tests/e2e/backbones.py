"""Stand-in backbones: a tiny random decoder of a preset's model family, saved with the family's chat template.

The rehearsal cannot download Qwen3-8B, so each preset's ``backbone.name_or_path`` is mapped to a
family (:data:`FAMILIES`) and replaced by a folder holding a 2-layer random model of that family's
architecture (``model_type`` as in the hub config) plus a tokenizer carrying the family's real chat
template. Templates and factories come from ``tests/fixtures`` (the families' real templates, with
their sources and licences noted there) when that package provides them; otherwise the offline
SmolLM2 tokenizer with its own template stands in, so the harness still runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "tests" / "fixtures" / "chat_templates"


@dataclass(frozen=True)
class Family:
    model_type: str  # transformers model_type of the hub checkpoint
    template: str  # file name under tests/fixtures/chat_templates


FAMILIES: dict[str, Family] = {
    "Qwen/Qwen3-8B": Family("qwen3", "Qwen3-8B.jinja"),
    "Qwen/Qwen3-4B-Instruct-2507": Family("qwen3", "Qwen3-4B-Instruct-2507.jinja"),
    "HuggingFaceTB/SmolLM3-3B": Family("smollm3", "SmolLM3-3B.jinja"),
}


def family_of(name_or_path: str) -> Family:
    try:
        return FAMILIES[name_or_path]
    except KeyError:
        raise KeyError(
            f"no stand-in for backbone {name_or_path!r}: add its family to tests/e2e/backbones.py FAMILIES"
        ) from None


def _fixture_factory():
    """``tests.fixtures.families`` when it offers a stand-in factory, else None."""
    try:
        mod = importlib.import_module("tests.fixtures.families")
    except ImportError:
        return None
    return getattr(mod, "save_standin", None)


def _tiny_config(model_type: str, vocab: int, tok) -> object:
    from transformers import AutoConfig

    return AutoConfig.for_model(
        model_type,
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=16384,  # the presets write 8192 tokens and read 512
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def save_standin(name_or_path: str, out_dir: Path, seed: int = 0) -> Path:
    """Write the stand-in of ``name_or_path`` to ``out_dir`` (a Hugging Face folder); returns it."""
    fam = family_of(name_or_path)
    factory = _fixture_factory()
    if factory is not None:
        return Path(factory(name_or_path, out_dir, seed=seed))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltamem.backbones.embedded import GGUF_FILE, embedded_folder

    tok = AutoTokenizer.from_pretrained(embedded_folder(), gguf_file=GGUF_FILE)
    template = TEMPLATES / fam.template
    if template.is_file():
        tok.chat_template = template.read_text()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_tiny_config(fam.model_type, len(tok), tok))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
