"""params.yaml sections and the MLflow helpers."""

from __future__ import annotations

import pytest

from pipeline import tracking
from pipeline.params import ParamsError, PrepareParams, load_params, load_section


def _write(tmp_path, text: str):
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_prepare_section_defaults_and_splits(tmp_path):
    path = _write(
        tmp_path,
        """
other_stage: {lr: 0.1}
prepare:
  datasets:
    - name: synthetic
      synthetic: {seed: 3, dialogues: {train: 4, test: 2}}
    - name: locomo
      source: ../shared/data/locomo/locomo10.json
    - name: qasper
      enabled: false
      source: hf
""",
    )
    params = load_section(path, "prepare")
    assert isinstance(params, PrepareParams)
    assert params.out_dir == "data/prepared" and params.tokenizer is None
    synthetic, locomo, qasper = params.datasets
    assert synthetic.split_names() == ["train", "test"]
    assert synthetic.reader_options() == {"seed": 3, "dialogues": {"train": 4, "test": 2}}
    assert locomo.split_names() == ["test"] and locomo.out_name == "locomo"
    assert qasper.split_names() == ["train", "validation", "test"] and not qasper.enabled
    assert load_section(path, "other_stage") == {"lr": 0.1}  # sections without a model come back raw
    assert set(load_params(path)) == {"other_stage", "prepare"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "prepare:\n  datasets: [{name: locomoo, source: x}]\n",
            "prepare': datasets.0.name: unknown dataset 'locomoo'; known datasets: gpqa, hotpotqa, ifeval, locomo, "
            "memoryagentbench, qasper, synthetic",
        ),
        ("prepare:\n  datasets: [{name: locomo}]\n", "datasets.0: dataset 'locomo' needs a source"),
        ("prepare:\n  datasets: [{name: synthetic, synthetic: {sesions: 2}}]\n", "unknown synthetic settings"),
        ("prepare:\n  datasets: [{name: synthetic, splits: [dev]}]\n", "splits ['dev'] have no count"),
        (
            "prepare:\n  datasets: [{name: ifeval, source: a}, {name: ifeval, source: b}]\n",
            "write to the same folder ['ifeval']",
        ),
        ("prepare:\n  datasets: [{name: ifeval, source: a, colour: red}]\n", "datasets.0.colour: Extra inputs"),
        ("prepare:\n  datasets: [{name: ifeval, source: a, enabled: false}]\n", "no enabled datasets"),
        ("other: 1\n", "no 'prepare' section (sections: other)"),
        ("prepare: [unclosed\n", "invalid YAML"),
    ],
)
def test_bad_params_name_file_section_and_key(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ParamsError) as err:
        load_section(path, "prepare")
    assert str(err.value).startswith(str(path))
    assert message in str(err.value)


def test_missing_params_file(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_section(tmp_path / "nope.yaml", "prepare")


def test_flatten():
    assert tracking.flatten({"a": {"b": 1, "c": {"d": "x"}}, "l": [1, 2], "ds": [{"n": 1}, {"n": 2}], "e": {}}) == {
        "a.b": 1,
        "a.c.d": "x",
        "l": [1, 2],
        "ds.0.n": 1,
        "ds.1.n": 2,
        "e": {},
    }


def test_tracking_uri_default_and_override(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri() == f"sqlite:///{tracking.REPO_ROOT / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/x.db")
    assert tracking.tracking_uri() == "sqlite:////tmp/x.db"


def test_nested_runs_params_metrics_and_json_artifact(mlflow_env):
    import mlflow

    with tracking.start_run("parent", tags={"stage": "test"}) as parent:
        tracking.log_params({"a": {"b": 1}, "long": "x" * 7000})
        tracking.log_metrics({"m": 2, "skip_nan": float("nan"), "skip_str": "x"})
        tracking.log_dict({"k": [1, 2]}, "info.json")
        with tracking.start_run("child", tags={"kind": "inner"}, nested=True) as child:
            tracking.log_metrics({"c": 1.5}, step=3)
    client = mlflow.tracking.MlflowClient()
    p = client.get_run(parent.info.run_id)
    c = client.get_run(child.info.run_id)
    assert p.data.params["a.b"] == "1" and len(p.data.params["long"]) == tracking.MAX_PARAM_LENGTH
    assert p.data.metrics == {"m": 2.0}
    assert p.data.tags["stage"] == "test"
    assert c.data.tags["mlflow.parentRunId"] == parent.info.run_id and c.data.metrics == {"c": 1.5}
    assert client.get_experiment(p.info.experiment_id).name == "pipeline-tests"
    # artifacts live next to the SQLite database, not in the working directory
    artifacts = mlflow_env.parent / "mlruns"
    assert (artifacts / "pipeline-tests" / parent.info.run_id / "artifacts" / "info.json").is_file()
