"""The rehearsal's override list changes only what it names, and says why for each change (fast)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e import cpu_overrides

REPO = Path(__file__).resolve().parents[2]
PRESETS = sorted((REPO / "configs").glob("*.yaml"))
CATEGORIES = ("offline", "cpu", "small", "workaround")


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {
            k: v for key, sub in tree.items() for k, v in _leaves(sub, f"{prefix}.{key}" if prefix else key).items()
        }
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in _leaves(sub, f"{prefix}[{i}]").items()}
    return {prefix: tree}


def _generic(path: str) -> str:
    """``evaluate.tasks[3].limit`` → ``evaluate.tasks[].limit`` (list positions dropped)."""
    import re

    return re.sub(r"\[[^\]]*\]", "[]", path)


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_only_the_listed_paths_change(preset):
    original = yaml.safe_load(preset.read_text())
    params, lines = cpu_overrides.apply(original, standin="/standin")
    before, after = _leaves(original), _leaves(params)
    changed = {_generic(k) for k in set(before) | set(after) if before.get(k, "<unset>") != after.get(k, "<unset>")}
    allowed = {_generic(o.path) for o in cpu_overrides.OVERRIDES}
    assert changed <= allowed, f"changed without an override: {sorted(changed - allowed)}"
    assert changed, "the overrides changed nothing"
    assert len(lines) == len(set(lines)) and all("->" in line for line in lines)
    # the names the data sets and variants are known by are untouched
    assert [d["name"] for d in params["prepare"]["datasets"]] == [d["name"] for d in original["prepare"]["datasets"]]
    assert params["train"]["variants"] == original["train"]["variants"]
    assert params["evaluate"]["conditions"] == original["evaluate"]["conditions"]


def test_every_override_says_why():
    for o in cpu_overrides.OVERRIDES:
        assert o.why.split(":")[0].split(" ")[0] in CATEGORIES, o
        if "workaround" in o.why:
            assert "issue" in o.why and "item" in o.why, f"{o.path}: name the issue item it works around"


def test_selectors_skip_what_a_preset_lacks():
    params, lines = cpu_overrides.apply({"prepare": {"datasets": [{"name": "locomo", "source": "x"}]}}, standin="/s")
    assert params["prepare"]["datasets"] == [{"name": "locomo", "source": "x"}]
    assert params["prepare"]["tokenizer"]["name_or_path"] == "/s"
    assert not any("qasper" in line for line in lines)
