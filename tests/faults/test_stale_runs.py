"""A stage killed while its MLflow run is open leaves it RUNNING; the next execution of any stage on this
host closes it as KILLED (a real sqlite store, real processes killed with SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

_OPEN_AND_HANG = """
import sys, time
from pipeline import tracking
with tracking.start_run(sys.argv[1], tags={"stage": sys.argv[1]}) as run:
    if sys.argv[1] == "evaluate":  # a unit's nested run is open too
        with tracking.start_run("eval-unit", tags={"stage": "evaluate"}, nested=True) as unit:
            print(run.info.run_id, unit.info.run_id, flush=True)
            time.sleep(600)
    print(run.info.run_id, flush=True)
    time.sleep(600)
"""


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri, "DELTAMEM_PIPELINE_STATE": str(tmp_path / "state.json")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("DELTAMEM_PIPELINE_ID", raising=False)
    return uri


def _killed_stage(stage: str, cwd: Path) -> list[str]:
    """Run ids of a process that opened ``stage``'s run, then was SIGKILLed."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _OPEN_AND_HANG, stage], cwd=cwd, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        ids = proc.stdout.readline().split()
        assert ids, "the stage process did not open its run"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    return ids


@pytest.mark.parametrize("stage", ["prepare", "train", "evaluate", "report"])
def test_the_next_execution_closes_a_killed_stages_runs_as_killed(stage, store, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    monkeypatch.chdir(tmp_path)
    killed = _killed_stage(stage, tmp_path)
    client = MlflowClient(store)
    assert all(client.get_run(r).info.status == "RUNNING" for r in killed)
    # a run of a live process (a parallel `dvc exp` queue) and one without process tags stay open
    exp = client.get_experiment_by_name(tracking.experiment_name()).experiment_id
    live = client.create_run(exp, tags={"stage": "train", **tracking.process_tags()}).info.run_id
    untagged = client.create_run(exp, tags={"stage": "train"}).info.run_id
    time.sleep(0.01)
    with tracking.start_run("prepare", tags={"stage": "prepare"}) as run:  # the next execution, any stage
        pass
    for r in killed:
        info = client.get_run(r)
        assert info.info.status == "KILLED" and info.data.tags["deltamem.closed_by"].startswith("a later"), r
    assert client.get_run(live).info.status == "RUNNING"
    assert client.get_run(untagged).info.status == "RUNNING"
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    err = capsys.readouterr().err
    assert all(f"closed the stale run {r}" in err for r in killed), err


def test_a_corrupt_pipeline_state_file_does_not_stop_a_stage(store, tmp_path, monkeypatch):
    """The pipeline's own bookkeeping (.deltamem/pipeline_run.json) is ours, not the user's input: garbage
    in it starts a fresh parent run instead of failing."""
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    state = tmp_path / "state.json"
    monkeypatch.setenv("DELTAMEM_PIPELINE_ID", "probe")
    for garbage in (b"", b"\xff\xfe{", b"[1, 2]", b'{"run_id": 5, "key": null}'):
        state.write_bytes(garbage)
        with tracking.start_run("prepare", tags={"stage": "prepare"}) as run:
            parent = run.data.tags["mlflow.parentRunId"]
        assert MlflowClient(store).get_run(parent).info.status == "RUNNING"
        tracking.finish_pipeline_run()
