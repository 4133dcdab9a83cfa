"""The evaluation runner in-process (``workers: 0``) on a tiny random Llama with the SmolLM2 vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.eval.conditions import DEFAULT_CONDITIONS
from pipeline.eval.runner import EvalError, plan, run_evaluate

from .conftest import make_params


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def predictions(out: Path, unit: str) -> list[str]:
    return [r["prediction"] for r in read_jsonl(out / unit / "predictions.jsonl")]


@pytest.fixture(scope="module")
def full_run(eval_root, worker, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    p = make_params(out)
    return out, run_evaluate(p, eval_root, progress=False, worker=worker)


def test_every_condition_end_to_end(full_run):
    out, summary = full_run
    expected = {f"base/{c}" for c in ("base_no_context", "base_full_context", "rag_bm25")}
    expected |= {f"{v}/{c}" for v in ("TSW", "SSW") for c in DEFAULT_CONDITIONS if c.startswith("deltamem")}
    assert set(summary.metrics) == expected  # SSW/deltamem_full_context too (writes per prompt message)
    assert list(summary.skipped_units) == []
    combined = json.loads((out / "metrics.json").read_text())
    assert set(combined) == expected
    for unit in expected:
        m = combined[unit]["synthetic"]
        assert m["n"] == 8 and m["cost/questions"] == 8 and m["cost/conversations"] == 4
        for key in ("em", "f1", "contains", "em/category/single-hop", "em/ci95_low", "headline", "cost/wall_s"):
            assert key in m, (unit, key)
        assert m["cost/forward_tokens"] > 0 and m["cost/peak_memory_bytes"] > 0
        assert (m["cost/state_bytes"] > 0) == unit.startswith(("TSW", "SSW"))
        rows = read_jsonl(out / unit / "synthetic" / "predictions.jsonl")
        assert len(rows) == 8
        for r in rows:
            assert {"example_id", "question", "prediction", "gold", "scores", "category"} <= set(r)
        assert json.loads((out / unit / "synthetic" / "metrics.json").read_text()) == m
    shuffled = read_jsonl(out / "TSW/deltamem_shuffled/synthetic/predictions.jsonl")
    assert all(r["memory_from"] != r["conversation_id"] for r in shuffled)
    # the (strong, random) memory changes the answers: the state is really used
    assert predictions(out, "TSW/deltamem_only/synthetic") != predictions(out, "base/base_no_context/synthetic")
    assert predictions(out, "TSW/deltamem_only/synthetic") != predictions(out, "TSW/deltamem_shuffled/synthetic")


def test_history_is_written_once_per_conversation_and_reuse_gives_the_same_answers(
    full_run, eval_root, worker, tmp_path
):
    out, summary = full_run
    m = summary.metrics["TSW/deltamem_only"]["synthetic"]
    assert m["cost/history_writes"] == 4  # 4 conversations, 8 questions
    assert m["cost/write_tokens"] == m["cost/history_tokens"]
    assert summary.metrics["base/base_no_context"]["synthetic"]["cost/history_writes"] == 0
    naive = make_params(tmp_path, variants=["TSW", "MSW"], conditions=["deltamem_only"], reuse_state=False)
    again = run_evaluate(naive, eval_root, progress=False, worker=worker)
    n = again.metrics["TSW/deltamem_only"]["synthetic"]
    assert n["cost/history_writes"] == 8 and n["cost/write_tokens"] > m["cost/write_tokens"]
    assert n["cost/forward_tokens"] > m["cost/forward_tokens"]
    assert predictions(tmp_path, "TSW/deltamem_only/synthetic") == predictions(out, "TSW/deltamem_only/synthetic")
    # MSW too, against its own reuse run
    reuse = make_params(tmp_path / "reuse", variants=["MSW"], conditions=["deltamem_only"])
    run_evaluate(reuse, eval_root, progress=False, worker=worker)
    assert predictions(tmp_path, "MSW/deltamem_only/synthetic") == predictions(
        tmp_path / "reuse", "MSW/deltamem_only/synthetic"
    )


def test_prefix_cache_gives_the_same_answers_with_fewer_tokens(full_run, eval_root, worker, tmp_path):
    out, summary = full_run
    p = make_params(
        tmp_path, variants=["TSW"], conditions=["base_full_context", "deltamem_full_context"], prefix_cache=False
    )
    plain = run_evaluate(p, eval_root, progress=False, worker=worker)
    for unit in ("base/base_full_context", "TSW/deltamem_full_context"):
        assert predictions(tmp_path, f"{unit}/synthetic") == predictions(out, f"{unit}/synthetic"), unit
        cached = summary.metrics[unit]["synthetic"]
        assert cached["cost/prefix_tokens_reused"] > 0
        assert cached["cost/forward_tokens"] < plain.metrics[unit]["synthetic"]["cost/forward_tokens"]
    # SSW writing online reads and writes each prompt in one call: nothing reused, the same answers either way
    ssw = make_params(tmp_path / "ssw", variants=["SSW"], conditions=["deltamem_full_context"], prefix_cache=False)
    run_evaluate(ssw, eval_root, progress=False, worker=worker)
    unit = "SSW/deltamem_full_context/synthetic"
    assert predictions(tmp_path / "ssw", unit) == predictions(out, unit)
    assert summary.metrics["SSW/deltamem_full_context"]["synthetic"]["cost/prefix_tokens_reused"] == 0


def test_a_task_without_history(eval_root, worker, tmp_path):
    p = make_params(tmp_path, variants=["TSW"], tasks=[{"dataset": "ifeval", "split": "test"}])
    s = run_evaluate(p, eval_root, progress=False, worker=worker)
    assert s.skipped_units == {
        "TSW/deltamem_shuffled/ifeval": "needs at least two conversations with a history (donor states)"
    }
    only = s.metrics["TSW/deltamem_only"]["ifeval"]
    assert only["n"] == 3 and "prompt_level_strict_acc" in only and only["cost/history_writes"] == 0
    # an empty state reads zeros: the same answers as the bare backbone
    assert predictions(tmp_path, "TSW/deltamem_only/ifeval") == predictions(tmp_path, "base/base_no_context/ifeval")
    assert predictions(tmp_path, "base/base_full_context/ifeval") == predictions(
        tmp_path, "base/base_no_context/ifeval"
    )


def test_truncated_window(eval_root, worker, tmp_path):
    p = make_params(tmp_path, variants=["TSW"], conditions=["base_full_context"], context_window=128)
    s = run_evaluate(p, eval_root, progress=False, worker=worker)
    m = s.metrics["base/base_full_context"]["synthetic"]
    assert m["cost/truncated_contexts"] == 4
    assert m["cost/max_prompt_tokens"] <= 128 - 6 - 50


def test_resume_skips_finished_shards_and_a_setting_change_recomputes(full_run, eval_root, worker):
    out, first = full_run
    assert first.reused == [] and len(first.computed) == 18  # 9 units × 2 shards
    again = run_evaluate(make_params(out), eval_root, progress=False, worker=worker)
    assert again.computed == [] and len(again.reused) == 18
    assert (
        again.metrics["TSW/deltamem_only"]["synthetic"]["em"] == first.metrics["TSW/deltamem_only"]["synthetic"]["em"]
    )
    changed = run_evaluate(make_params(out, bm25_k=1), eval_root, progress=False, worker=worker)
    assert sorted(changed.computed) == ["base/rag_bm25/synthetic/shard-0000", "base/rag_bm25/synthetic/shard-0001"]
    # a condition dropped from the params: its folders go, the others stay
    fewer = make_params(out, bm25_k=1, conditions=["base_no_context", "deltamem_only"])
    assert run_evaluate(fewer, eval_root, progress=False, worker=worker).computed == []
    assert sorted(d.name for d in (out / "base").iterdir()) == ["base_no_context"]
    assert sorted(d.name for d in (out / "TSW").iterdir()) == ["deltamem_only"]


def test_failures_are_retried_then_fail_the_run_and_a_rerun_computes_only_the_missing_shard(
    eval_root, worker, tmp_path
):
    kw = {"variants": ["TSW"], "conditions": ["base_no_context", "deltamem_only"]}
    flaky = make_params(tmp_path, inject_failures={"TSW/deltamem_only/*/shard-0001": 1}, **kw)
    s = run_evaluate(flaky, eval_root, progress=False, worker=worker)
    assert len(s.computed) == 4  # the flaky shard failed once, then succeeded on its retry

    out = tmp_path / "broken"
    broken = make_params(out, inject_failures={"TSW/deltamem_only/*/shard-0001": 5}, **kw)
    with pytest.raises(EvalError, match=r"TSW/deltamem_only/synthetic/shard-0001: RuntimeError: injected failure"):
        run_evaluate(broken, eval_root, progress=False, worker=worker)
    shards = out / "TSW/deltamem_only/synthetic/shards"
    assert sorted(f.name for f in shards.iterdir()) == ["shard-0000.jsonl", "shard-0000.meta.json"]
    assert not (out / "metrics.json").exists()
    mtimes = {f: f.stat().st_mtime_ns for f in out.rglob("shard-*")}
    fixed = run_evaluate(make_params(out, **kw), eval_root, progress=False, worker=worker)
    assert fixed.computed == ["TSW/deltamem_only/synthetic/shard-0001"]
    assert all(f.stat().st_mtime_ns == t for f, t in mtimes.items())
    assert (out / "metrics.json").exists()


def test_missing_inputs_are_named(eval_root, tmp_path):
    with pytest.raises(EvalError, match="adapter of variant 'XSW' not found"):
        plan(make_params(tmp_path, variants=["XSW"]), eval_root)
    with pytest.raises(EvalError, match="prepared split not found"):
        plan(make_params(tmp_path, tasks=[{"dataset": "synthetic", "split": "nope"}]), eval_root)
    with pytest.raises(EvalError, match="backbone not found"):
        plan(make_params(tmp_path, backbone="models/nothing"), eval_root)
