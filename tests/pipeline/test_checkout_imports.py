"""The code that runs is the checkout's (issue 11 item 10): stage commands, and where MLflow logs.

The end-to-end checks (a second clone next to the installed checkout, and `dvc exp run --temp`) are in
tests/pipeline/test_workflow.py and tests/e2e; these are the fast parts.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from pipeline import tracking

REPO = Path(__file__).resolve().parents[2]


def test_every_stage_runs_as_a_module_from_the_repository_root():
    """`python stages/x.py` puts stages/ first on sys.path, so `import pipeline` finds an installed checkout;
    `python -m stages.x` (run from the root, DVC's default wdir) finds this one."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in spec.items():
        stage = stage.get("do", stage)
        assert re.match(r"python -m stages\.\w+ ", stage["cmd"]), f"{name}: {stage['cmd']}"
        assert stage.get("wdir", ".") == ".", name
    assert (REPO / "stages" / "__init__.py").is_file()


def test_temporary_experiment_workspaces_log_to_the_owning_repository(monkeypatch, tmp_path):
    repo = tmp_path / "repo"
    temp = repo / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    assert tracking.owning_repository(temp) == repo
    assert tracking.owning_repository(repo) == repo
    assert tracking.owning_repository(tmp_path / "exps" / "x") == tmp_path / "exps" / "x"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking, "REPO_ROOT", temp)
    assert tracking.tracking_uri() == f"sqlite:///{repo / 'mlflow.db'}"
    monkeypatch.setattr(tracking, "REPO_ROOT", repo)
    assert tracking.tracking_uri() == f"sqlite:///{repo / 'mlflow.db'}"
