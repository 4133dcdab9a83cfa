"""pipeline.common (one atomic writer, JSON without NaN, dtypes, pad id) and the one bootstrap."""

from __future__ import annotations

import json
import math
import os
import stat
from types import SimpleNamespace

import pytest

from pipeline.common import (
    DTYPES,
    atomic_dir,
    atomic_write_json,
    atomic_write_lines,
    atomic_write_text,
    check_dtype,
    json_safe,
    pad_token_id,
    torch_dtype,
)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_file_writes_replace_with_ordinary_permissions_and_leave_no_temporary(tmp_path):
    umask = os.umask(0o022)
    try:
        target = tmp_path / "sub" / "a.txt"
        atomic_write_text(target, "one\n")
        atomic_write_lines(target, ["x", "y"])
        assert target.read_text() == "x\ny\n"
        assert _mode(target) == 0o644  # mkstemp's 0600 is not what a plain write gives
        atomic_write_json(tmp_path / "m.json", {"b": math.nan, "a": [1.0, math.inf]}, sort_keys=True)
        assert json.loads((tmp_path / "m.json").read_text()) == {"a": [1.0, None], "b": None}
        assert (tmp_path / "m.json").read_text().endswith("}\n")
    finally:
        os.umask(umask)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["a.txt"]


def test_a_failed_file_write_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")

    def lines():
        yield "new"
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write_lines(target, lines())
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_dir_replaces_a_tree_and_restores_it_on_failure(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.")
        (tmp / "f").write_text("1")
        (tmp / "d").mkdir()
    assert (final / "f").read_text() == "1"
    assert _mode(final) == 0o777 & ~_umask() and _mode(final / "f") == 0o666 & ~_umask()
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "g").write_text("2")
        raise RuntimeError("half way")
    assert sorted(p.name for p in final.iterdir()) == ["d", "f"]
    with atomic_dir(final) as tmp:
        (tmp / "g").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["g"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or old sibling left


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_dtypes_and_pad_id():
    import torch

    assert [torch_dtype(n) for n in DTYPES] == [torch.float32, torch.bfloat16, torch.float16]
    assert check_dtype("bfloat16") == "bfloat16"
    with pytest.raises(ValueError, match=r"float64.*float32, bfloat16, float16"):
        check_dtype("float64")
    assert pad_token_id(SimpleNamespace(pad_token_id=3, eos_token_id=2)) == 3
    assert pad_token_id(SimpleNamespace(pad_token_id=0, eos_token_id=2)) == 0  # 0 is a pad id, not "none"
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2


def test_json_safe():
    assert json_safe({1: (math.nan, 2.0), "x": {"y": -math.inf}}) == {"1": [None, 2.0], "x": {"y": None}}


def test_the_evaluator_headline_interval_is_the_report_interval():
    """Same resamples and seed: the evaluator's ci95 and the report's interval are the same numbers."""
    import numpy as np

    from pipeline.eval.aggregate import headline_interval
    from pipeline.stats import mean_interval

    x = list(np.random.default_rng(3).random(37).round(2))
    iv = mean_interval(x, 500, 7, 0.95)
    assert headline_interval(x, 500, 7) == (iv.low, iv.high)
    assert headline_interval([*x, None, math.nan], 500, 7) == (iv.low, iv.high)  # unscored rows left out
    assert iv.low < float(np.mean(x)) < iv.high
    assert all(math.isnan(v) for v in headline_interval([], 500, 7) + headline_interval(x, 0, 7))
