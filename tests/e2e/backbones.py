"""Stand-in backbones: a tiny random decoder of a preset's model family, saved with the family's chat template.

The rehearsal cannot download Qwen3-8B, so each preset's ``backbone.name_or_path`` is mapped to a
stand-in family of ``tests/fixtures/families.py`` (a byte-level BPE tokenizer with the family's special
tokens and its published chat template, ``tests/fixtures/chat_templates/``, sources and licences in
``SOURCES.md`` there; a 2-layer random model of the family's architecture). A family without its own
template there yet falls back to the nearest one, and :func:`family_of` says so (printed by the test).
"""

from __future__ import annotations

from pathlib import Path

from tests.fixtures import families

# hub id → (stand-in family, fallback while tests/fixtures lacks the family's template)
PRESET_FAMILIES: dict[str, tuple[str, str | None]] = {
    "Qwen/Qwen3-8B": ("qwen3", None),
    "Qwen/Qwen3-4B-Instruct-2507": ("qwen3-instruct-2507", None),
    "HuggingFaceTB/SmolLM3-3B": ("smollm3", None),
}
MAX_POSITIONS = 16384  # the presets write 8192 tokens and read 512; byte-level tokens make texts long


def family_of(name_or_path: str) -> tuple[str, str | None]:
    """(the stand-in family, a note when it is a fallback) for a preset's backbone."""
    if name_or_path not in PRESET_FAMILIES:
        raise KeyError(f"no stand-in for backbone {name_or_path!r}: add it to tests/e2e/backbones.py PRESET_FAMILIES")
    family, fallback = PRESET_FAMILIES[name_or_path]
    if family in families.FAMILIES:
        return family, None
    if fallback is None:
        raise KeyError(f"tests/fixtures/families.py has no family {family!r}")
    return fallback, f"{name_or_path}: no {family!r} template in tests/fixtures yet, using {fallback!r}'s"


def save_standin(name_or_path: str, out_dir: Path, seed: int = 0) -> Path:
    """Write the stand-in of ``name_or_path`` to ``out_dir`` (a Hugging Face folder); returns it."""
    family, _ = family_of(name_or_path)
    return families.save_standin(family, out_dir, seed=seed, attn="sdpa", max_positions=MAX_POSITIONS)
