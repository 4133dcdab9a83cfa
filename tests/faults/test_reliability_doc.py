"""docs/RELIABILITY.md names only tests that exist (a guarantee whose proof was renamed away fails here)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_test_named_in_reliability_md_exists():
    text = (REPO / "docs" / "RELIABILITY.md").read_text(encoding="utf-8")
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text)
    assert len(named) > 30
    missing = []
    for path, name in named:
        source = REPO / path
        code = source.read_text(encoding="utf-8") if source.is_file() else ""
        if not re.search(rf"^(def {name}\(|{name}\b.*=)", code, re.M):
            missing.append(f"{path}::{name}")
    assert not missing, missing
