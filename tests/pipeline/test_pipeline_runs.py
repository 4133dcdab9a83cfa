"""MLflow: one parent run per pipeline execution, stage runs nested under it, tags on every run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline import tracking

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DELTAMEM_PIPELINE_STATE", str(tmp_path / "state" / "pipeline_run.json"))
    params = tmp_path / "params.yaml"
    params.write_text("train: {optim: {lr: 0.005, steps: 60}, variants: {TSW: {write_mode: TSW}}}\n")
    monkeypatch.setenv("DELTAMEM_PARAMS_FILE", str(params))
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])  # process-global: set it for this store
    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def _run(client, run_id):
    return client.get_run(run_id)


def test_stage_runs_share_one_parent_per_execution(store, monkeypatch):
    monkeypatch.setenv("DELTAMEM_PIPELINE_ID", "exec-1")
    with tracking.start_run("prepare", tags={"stage": "prepare"}) as a:
        pass
    with (
        tracking.start_run(
            "train-TSW", tags={"stage": "train", "variant": "TSW", "backbone": "embedded", "seed": 0}
        ) as b,
        tracking.start_run("inner", nested=True) as inner,
    ):
        pass
    ra, rb, ri = _run(store, a.info.run_id), _run(store, b.info.run_id), _run(store, inner.info.run_id)
    parent_id = ra.data.tags["mlflow.parentRunId"]
    assert rb.data.tags["mlflow.parentRunId"] == parent_id
    assert ri.data.tags["mlflow.parentRunId"] == b.info.run_id  # nested runs stay under their stage run
    assert rb.data.tags["variant"] == "TSW" and rb.data.tags["backbone"] == "embedded" and rb.data.tags["seed"] == "0"
    assert len(rb.data.tags["mlflow.source.git.commit"]) == 40 and rb.data.tags["git.dirty"] in ("true", "false")
    parent = _run(store, parent_id)
    assert parent.info.status == "RUNNING" and parent.data.tags["deltamem.kind"] == "pipeline"
    assert parent.data.params["train.optim.lr"] == "0.005"  # the whole params file, flattened
    assert parent.data.params["train.variants.TSW.write_mode"] == "TSW"

    assert tracking.finish_pipeline_run() == parent_id
    assert _run(store, parent_id).info.status == "FINISHED"

    monkeypatch.setenv("DELTAMEM_PIPELINE_ID", "exec-2")
    with tracking.start_run("prepare") as c:
        pass
    assert _run(store, c.info.run_id).data.tags["mlflow.parentRunId"] != parent_id


def test_an_unfinished_parent_is_closed_by_the_next_execution(store, monkeypatch):
    monkeypatch.setenv("DELTAMEM_PIPELINE_ID", "exec-a")
    with tracking.start_run("train-TSW") as a:
        pass
    first = _run(store, a.info.run_id).data.tags["mlflow.parentRunId"]
    monkeypatch.setenv("DELTAMEM_PIPELINE_ID", "exec-b")
    with tracking.start_run("train-TSW"):
        pass
    old = _run(store, first)
    assert old.info.status == "FINISHED" and old.data.tags["deltamem.closed_by"] == "next pipeline execution"


def test_a_failing_stage_fails_the_parent(store, monkeypatch):
    monkeypatch.setenv("DELTAMEM_PIPELINE_ID", "exec-f")
    with pytest.raises(RuntimeError), tracking.start_run("evaluate") as a:
        run_id = a.info.run_id
        raise RuntimeError("boom")
    run = _run(store, run_id)
    assert run.info.status == "FAILED"
    assert _run(store, run.data.tags["mlflow.parentRunId"]).info.status == "FAILED"


def test_a_stage_run_by_hand_has_no_parent(store, monkeypatch):
    monkeypatch.delenv("DELTAMEM_PIPELINE_ID", raising=False)
    assert tracking.execution_key() is None  # pytest is not started by dvc
    with tracking.start_run("prepare") as a:
        pass
    assert "mlflow.parentRunId" not in _run(store, a.info.run_id).data.tags


@pytest.mark.slow
def test_dvc_repro_groups_its_stages_under_one_parent(tmp_path, store, monkeypatch):
    """Real `dvc repro` in a temporary git repository: two stages, one parent run; a second repro is a no-op."""
    monkeypatch.delenv("DELTAMEM_PIPELINE_ID", raising=False)
    monkeypatch.delenv("DELTAMEM_PARAMS_FILE", raising=False)
    repo = tmp_path / "repo"
    repo.mkdir()
    script = textwrap.dedent(
        """
        import sys
        from pipeline import tracking
        name = sys.argv[1]
        with tracking.start_run(name, tags={"stage": name}) as run:
            tracking.log_metrics({"x": 1.0})
        open(name + ".out", "w").write(run.info.run_id)
        if name == "second":
            tracking.finish_pipeline_run()
        """
    )
    (repo / "stage.py").write_text(script)
    (repo / "params.yaml").write_text("a: {b: 1}\n")
    (repo / "dvc.yaml").write_text(
        textwrap.dedent(
            f"""
            stages:
              first:
                cmd: {sys.executable} stage.py first
                deps: [stage.py]
                params: [a]
                outs: [first.out]
              second:
                cmd: {sys.executable} stage.py second
                deps: [first.out]
                outs: [second.out]
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "DELTAMEM_PIPELINE_STATE": str(repo / ".deltamem" / "run.json")}
    dvc = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")

    def sh(*cmd: str) -> str:
        done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{cmd}: {done.stdout}\n{done.stderr}"
        return done.stdout

    sh("git", "init", "-q")
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "init")
    sh(dvc, "init", "-q")
    sh(dvc, "repro")
    first, second = (repo / "first.out").read_text(), (repo / "second.out").read_text()
    p1 = _run(store, first).data.tags["mlflow.parentRunId"]
    assert _run(store, second).data.tags["mlflow.parentRunId"] == p1
    parent = _run(store, p1)
    assert parent.info.status == "FINISHED" and parent.data.params["a.b"] == "1"
    again = sh(dvc, "repro")
    assert "didn't change" in again or "up to date" in again
    assert (repo / "first.out").read_text() == first  # no stage reran
