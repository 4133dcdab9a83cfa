""":mod:`pipeline.stages.evaluate`: params → results/eval and the MLflow runs (parent + one nested run per unit)."""

from __future__ import annotations

import json

import yaml

from pipeline.stages.evaluate import main


def write_params(path, root, out, **overrides) -> None:
    section = {
        "backbone": str(root / "models" / "backbone"),
        "models_dir": str(root / "models"),
        "data_dir": str(root / "data" / "prepared"),
        "out_dir": str(out),
        "variants": ["TSW"],
        "conditions": ["base_no_context", "deltamem_only"],
        "tasks": [{"dataset": "synthetic", "split": "test", "limit": 4}],
        "workers": 0,
        "threads": 1,
        "max_new_tokens_cap": 4,
        "bootstrap": 20,
        **overrides,
    }
    path.write_text(yaml.safe_dump({"evaluate": section}))


def test_stage_writes_results_and_logs_nested_mlflow_runs(eval_root, tmp_path, mlflow_env, capsys):
    import mlflow

    params, out = tmp_path / "params.yaml", tmp_path / "results"
    write_params(params, eval_root, out)
    assert main(["--params", str(params)]) == 0
    assert "2 shards computed" in capsys.readouterr().out
    combined = json.loads((out / "metrics.json").read_text())
    assert set(combined) == {"base/base_no_context", "TSW/deltamem_only"}
    assert combined["TSW/deltamem_only"]["synthetic"]["n"] == 4

    mlflow.set_tracking_uri(f"sqlite:///{mlflow_env}")
    runs = mlflow.search_runs(experiment_names=["pipeline-tests"], filter_string="tags.stage = 'evaluate'")
    parent = runs[runs["tags.mlflow.runName"] == "evaluate"].iloc[0]
    children = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"]]
    assert sorted(children["tags.mlflow.runName"]) == [
        "eval-TSW-deltamem_only-synthetic",
        "eval-base-base_no_context-synthetic",
    ]
    child = children[children["tags.condition"] == "deltamem_only"].iloc[0]
    assert "metrics.em/category/single-hop" in runs.columns and child["metrics.n"] == 4
    assert "metrics.cost/forward_tokens" in runs.columns
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(child["run_id"])}
    assert {"predictions.jsonl", "metrics.json"} <= artifacts


def test_stage_errors(eval_root, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    write_params(params, eval_root, tmp_path / "out", conditions=["nope"])
    assert main(["--params", str(params), "--no-tracking"]) == 2
    assert "unknown condition" in capsys.readouterr().err
    write_params(params, eval_root, tmp_path / "out", variants=["XSW"])
    assert main(["--params", str(params), "--no-tracking"]) == 2
    assert "adapter of variant 'XSW' not found" in capsys.readouterr().err
