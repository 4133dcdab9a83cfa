"""The ``scoring`` choice in the evaluate params, end to end on a tiny random Llama: validated,
recorded in every row, shard and metrics file, and a change re-scores the stored predictions
without generating again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.data.schema import Example, write_split
from pipeline.eval.runner import EvalInputError, EvalParams, TaskEntry, plan, run_evaluate
from pipeline.eval.tasks import scoring_id
from tests.pipeline.eval.conftest import tiny_backbone


@pytest.fixture(scope="module")
def root(smol_tokenizer, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scoringroot")
    model = tiny_backbone(smol_tokenizer)
    model.save_pretrained(root / "models" / "backbone")
    smol_tokenizer.save_pretrained(root / "models" / "backbone")
    gpqa = [
        Example(f"gpqa-{i}", "gpqa", f"Question {i}?", ["ABCD"[i]], category="Physics", choices=["w", "x", "y", "z"])
        for i in range(3)
    ]
    write_split(gpqa, root / "data" / "prepared" / "gpqa" / "test.jsonl")
    recsys = [
        Example(
            "mab-rec-0",
            "memoryagentbench",
            "Recommend movies.",
            ["3", "4"],
            category="test_time_learning",
            metadata={"source": "recsys_redial_full", "conversation_id": "recsys_redial_full-0"},
        )
    ]
    write_split(recsys, root / "data" / "prepared" / "memoryagentbench" / "test.jsonl")
    return root


def _params(out: Path, scoring: str, dataset: str = "gpqa") -> EvalParams:
    return EvalParams(
        tasks=[{"dataset": dataset, "split": "test", "scoring": scoring}],
        conditions=["base_no_context"],
        variants=[],
        out_dir=str(out),
        workers=0,
        threads=1,
        batch_size=3,
        bootstrap=0,
        max_new_tokens_cap=4,
    )


def test_unknown_scoring_is_a_clear_params_error():
    with pytest.raises(ValidationError, match="unknown scoring 'paper'; known: official, delta-mem"):
        TaskEntry(dataset="gpqa", scoring="paper")
    assert TaskEntry(dataset="gpqa").scoring == "official"


def test_changing_scoring_rescores_without_generating(root, tmp_path):
    out = tmp_path / "eval"
    unit = out / "base" / "base_no_context" / "gpqa"
    first = run_evaluate(_params(out, "official"), root, progress=False)
    assert first.computed and not first.rescored
    rows = [json.loads(line) for line in (unit / "predictions.jsonl").read_text().splitlines()]
    assert {r["scoring"] for r in rows} == {"official"}
    assert json.loads((unit / "metrics.json").read_text())["scoring"] == "official"
    meta = json.loads((unit / "shards" / "shard-0000.meta.json").read_text())
    assert meta["scoring"] == scoring_id("official")
    # tamper with a stored score: re-scoring must recompute it from the stored prediction
    shard = unit / "shards" / "shard-0000.jsonl"
    stored = [json.loads(line) for line in shard.read_text().splitlines()]
    stored[0]["scores"]["accuracy"] = 0.123
    shard.write_text("".join(json.dumps(r) + "\n" for r in stored))

    second = run_evaluate(_params(out, "delta-mem"), root, progress=False)
    assert second.computed == []  # nothing generated again
    assert second.rescored == second.reused == [s for s in first.computed]
    again = [json.loads(line) for line in (unit / "predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in again] == [r["prediction"] for r in rows]
    assert [r["new_tokens"] for r in again] == [r["new_tokens"] for r in rows]
    assert {r["scoring"] for r in again} == {"delta-mem"}
    assert again[0]["scores"]["accuracy"] in (0.0, 1.0)
    metrics = json.loads((unit / "metrics.json").read_text())
    assert metrics["scoring"] == "delta-mem"
    assert json.loads((out / "metrics.json").read_text())["base/base_no_context"]["gpqa"]["scoring"] == "delta-mem"
    assert json.loads((unit / "shards" / "shard-0000.meta.json").read_text())["scoring"] == scoring_id("delta-mem")

    third = run_evaluate(_params(out, "delta-mem"), root, progress=False)
    assert third.computed == [] and third.rescored == []


def test_recsys_id_golds_without_entity2id_stop_the_plan(root, tmp_path):
    with pytest.raises(EvalInputError, match=r"scoring 'delta-mem': .*entity2id\.json: not found; recsys golds"):
        plan(_params(tmp_path, "delta-mem", "memoryagentbench"), root)
    mapping = root / "data" / "prepared" / "memoryagentbench" / "entity2id.json"
    mapping.write_text(json.dumps({"Heat": 3, "Up": 4}))
    try:
        (unit,) = plan(_params(tmp_path, "official", "memoryagentbench"), root)
        assert unit.scoring == "official" and unit.shards[0].scoring == "official"
    finally:
        mapping.unlink()
