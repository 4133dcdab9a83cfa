"""The code that runs is the checkout's (issue 11 item 10): stage commands, the CLI, and where MLflow logs.

The end-to-end checks (a second clone next to the installed checkout, and `dvc exp run --temp`) are in
tests/pipeline/test_workflow.py and tests/e2e; these are the fast parts.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline import cli, tracking

REPO = Path(__file__).resolve().parents[2]


def test_every_stage_runs_as_a_module_from_the_repository_root():
    """`python path/to/x.py` puts the script's folder first on sys.path, so `import pipeline` may find an
    installed checkout; `python -m pipeline.stages.x` (run from the root, DVC's default wdir) finds this one."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in spec.items():
        stage = stage.get("do", stage)
        m = re.match(r"python -m pipeline\.stages\.(\w+) ", stage["cmd"])
        assert m, f"{name}: {stage['cmd']}"
        assert (REPO / "pipeline" / "stages" / f"{m.group(1)}.py").is_file(), name
        assert stage.get("wdir", ".") == ".", name
    assert not list(REPO.glob("stages/*.py")), "the stage modules live in pipeline/stages/"


def test_the_cli_imports_the_stage_modules_of_its_own_package():
    """No stage is loaded by file path: the CLI's stage mains are this package's modules."""
    for verb, (name, _) in cli.STAGE_VERBS.items():
        module = cli.load_stage(name)
        assert module.__name__ == f"pipeline.stages.{name}", verb
        assert Path(module.__file__).resolve() == REPO / "pipeline" / "stages" / f"{name}.py", verb
        assert cli.stage_main(name) is module.main


def _fake_checkout(root: Path) -> Path:
    """A second 'checkout' whose pipeline.cli only says which file it is."""
    (root / "pipeline" / "stages").mkdir(parents=True)
    (root / "pipeline" / "__init__.py").write_text("")
    (root / "pipeline" / "stages" / "__init__.py").write_text("")
    (root / "pipeline" / "cli.py").write_text("import sys\nprint('ran', __file__, sys.argv[1:])\n")
    return root


def test_the_cli_run_from_another_checkout_runs_that_checkouts_code(tmp_path):
    """The installed command (this checkout's pipeline.cli, first on sys.path) run from the root of another
    checkout re-runs itself there, so that checkout's code runs; from elsewhere it runs its own."""
    other = _fake_checkout(tmp_path / "other")
    assert cli.foreign_checkout(other) == other
    assert cli.foreign_checkout(REPO) is None and cli.foreign_checkout(tmp_path) is None
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); from pipeline.cli import main; sys.exit(main())"
    env = {k: v for k, v in os.environ.items() if k != "DELTAMEM_CLI_CHECKOUT"}
    res = subprocess.run(
        [sys.executable, "-c", code, "report", "--no-tracking"], cwd=other, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["ran", str(other / "pipeline" / "cli.py"), "['report',", "'--no-tracking']"]
    res = subprocess.run(  # not a checkout: this package's own report stage, which finds no params file
        [sys.executable, "-c", code, "report", "--no-tracking"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert res.returncode == 2 and "ran" not in res.stdout, res.stdout + res.stderr


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
