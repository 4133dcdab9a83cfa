"""Resume that survives moving the repository; prefix reuse under sampled (``decoding: paper``) decoding."""

from __future__ import annotations

import dataclasses
import shutil
import zlib

from pipeline.eval.runner import plan, run_evaluate
from pipeline.eval.tasks import Decoding, get_task

from .conftest import make_params
from .test_runner import predictions


def test_moving_the_repository_reuses_every_shard(eval_root, worker, tmp_path):
    """Config hashes hold no absolute path: a moved (or copied) checkout with its results recomputes nothing.
    (The IFEval split has no contexts file: its absent path used to be hashed.)"""
    first = tmp_path / "first"
    shutil.copytree(eval_root, first)
    tasks = [{"dataset": "synthetic", "split": "test"}, {"dataset": "ifeval", "split": "test"}]
    kw = {"variants": ["TSW"], "conditions": ["base_no_context", "deltamem_only"], "tasks": tasks}
    p = make_params("results/eval", **kw)  # relative to the repository root
    before = run_evaluate(p, first, progress=False, worker=worker)
    assert len(before.computed) == 8 and not before.reused
    hashes = {s.key: s.config_hash for u in plan(p, first) for s in u.shards}

    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    first.rename(moved)
    copied = tmp_path / "copied"
    shutil.copytree(moved, copied)
    for root in (moved, copied):
        assert {s.key: s.config_hash for u in plan(p, root) for s in u.shards} == hashes
        again = run_evaluate(p, root, progress=False, worker=worker)
        assert again.computed == [] and sorted(again.reused) == sorted(before.computed)
        assert predictions(root / "results/eval", "TSW/deltamem_only/synthetic") == predictions(
            moved / "results/eval", "TSW/deltamem_only/synthetic"
        )


def test_sampled_decoding_reuses_the_conversation_prefix_with_the_same_predictions(
    eval_root, worker, tmp_path, monkeypatch
):
    """Under ``decoding: paper`` with a sampling task, a conversation's full-context questions continue
    from one prefill (one question per generate call, seeded per question) and give exactly the answers
    of generating each whole prompt on its own."""
    task = get_task("synthetic")
    plain_decoding = task.decoding

    def paper(example=None, mode="greedy", index=None):
        d = plain_decoding(example, mode, index)
        if mode != "paper":
            return d
        n = zlib.crc32(example.example_id.encode()) % 1000 if example is not None else 0
        return dataclasses.replace(d, do_sample=True, temperature=1.5, top_p=0.95, top_k=50, seed=1000 + n)

    monkeypatch.setattr(task, "decoding", paper)
    assert isinstance(task.decoding(None, "paper"), Decoding)
    conds = ["base_full_context", "deltamem_full_context"]
    kw = {"variants": ["TSW"], "conditions": conds, "decoding": "paper", "max_new_tokens_cap": 8}
    reuse = run_evaluate(make_params(tmp_path / "reuse", **kw), eval_root, progress=False, worker=worker)
    alone = run_evaluate(
        make_params(tmp_path / "alone", prefix_cache=False, **kw),
        eval_root,
        progress=False,
        worker=worker,
    )
    greedy = run_evaluate(
        make_params(tmp_path / "greedy", **{**kw, "decoding": "greedy"}),
        eval_root,
        progress=False,
        worker=worker,
    )
    sampled_differs = False
    for unit in ("base/base_full_context", "TSW/deltamem_full_context"):
        m, a = reuse.metrics[unit]["synthetic"], alone.metrics[unit]["synthetic"]
        assert m["cost/prefix_tokens_reused"] > 0 and a["cost/prefix_tokens_reused"] == 0
        assert m["cost/forward_tokens"] < a["cost/forward_tokens"]
        assert predictions(tmp_path / "reuse", f"{unit}/synthetic") == predictions(
            tmp_path / "alone", f"{unit}/synthetic"
        ), unit
        sampled_differs |= predictions(tmp_path / "reuse", f"{unit}/synthetic") != predictions(
            tmp_path / "greedy", f"{unit}/synthetic"
        )
    assert greedy.metrics and sampled_differs  # the sampling really happened
