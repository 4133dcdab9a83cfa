"""The whole workflow for real: `dvc repro` of this repository's dvc.yaml in a temporary git clone.

A shrunken copy of the shipped params.yaml (a few dialogues, 3 optimiser steps, 6 questions) runs every
stage — prepare → backbone (the embedded SmolLM2) → train@TSW → evaluate (all conditions) → report —
then checks what users rely on: the report and metrics exist, MLflow holds one parent run with the stage
runs under it, a second `dvc repro` reruns nothing, changing one evaluation parameter reruns only
evaluate and report, `dvc exp run -S` / `dvc exp show` / `dvc exp apply` / `dvc metrics diff` give each
experiment's numbers, a failing stage loses no computed metrics, and every process of `dvc repro` and of
`dvc exp run --temp` imports the clone it runs in (no PYTHONPATH; the venv's editable install is another
checkout), with MLflow runs in the clone's database.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.e2e import probe

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _copy_project(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file() and not name.startswith(("tests/", "bench/results")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def _shrink(params_file: Path) -> None:
    p = yaml.safe_load(params_file.read_text())
    synth = p["prepare"]["datasets"][0]
    assert synth["name"] == "synthetic"
    synth["synthetic"]["dialogues"] = {"train": 24, "validation": 6, "test": 6}
    p["prepare"]["datasets"] = [synth]
    p["train"]["limit_validation"] = 4
    p["train"]["optim"].update(steps=3, batch_size=2, checkpoint_every=0)
    p["evaluate"]["tasks"] = [{"dataset": "synthetic", "split": "test", "limit": 6}]
    p["evaluate"].update(workers=0, bootstrap=100, batch_size=6)
    p["report"].update(bootstrap=200, permutations=200)
    params_file.write_text(yaml.safe_dump(p, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("workflow") / "repo"
    root.mkdir()
    _copy_project(root)
    probe.install(root)
    _shrink(root / "params.yaml")
    venv_bin = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
        probe.ENV: str(root.parent / "imports.log"),  # which checkout each process imported
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        "TQDM_DISABLE": "1",
    }
    for key in (
        "PYTHONPATH",
        "MLFLOW_TRACKING_URI",
        "DELTAMEM_PIPELINE_ID",
        "DELTAMEM_PIPELINE_STATE",
        "DELTAMEM_PARAMS_FILE",
        "MLFLOW_EXPERIMENT_NAME",
    ):
        env.pop(key, None)
    git = ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci"]
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], [*git[1:], "commit", "-qm", "copy"]):
        subprocess.run(cmd if cmd[0] == "git" else ["git", *cmd], cwd=root, env=env, check=True, capture_output=True)
    return root, env


def sh(project: tuple[Path, dict[str, str]], *cmd: str, timeout: int = 900, stdout_only: bool = False) -> str:
    root, env = project
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout if stdout_only else done.stdout + done.stderr


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_repro_end_to_end(project):
    root, env = project
    out = sh(project, "dvc", "repro")
    assert ran(out) == {"prepare", "backbone", "train@TSW", "evaluate", "report"}
    imports = probe.read(Path(env[probe.ENV]))
    assert not probe.foreign(imports, root), probe.foreign(imports, root)  # never the installed checkout
    assert probe.kinds(imports) >= {"prepare", "backbone", "train", "evaluate", "report"}
    report = (root / "reports" / "report.md").read_text()
    assert "## Claims checked" in report and "deltamem_shuffled" in report and "## Cost" in report
    html = (root / "reports" / "report.html").read_text()
    assert "data:image/png;base64," in html
    summary = json.loads((root / "reports" / "summary.json").read_text())
    assert "TSW/deltamem_only/synthetic/vs/base_no_context/ratio" in summary
    evaluate = json.loads((root / "results" / "metrics" / "evaluate.json").read_text())
    assert set(evaluate) == {
        "base/base_no_context",
        "base/base_full_context",
        "base/rag_bm25",
        "TSW/deltamem_only",
        "TSW/deltamem_full_context",
        "TSW/deltamem_shuffled",
    }

    # MLflow: one parent run for this execution, every stage run nested under it, closed by the report
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")  # the clone's own database (no env var)
    exp = client.get_experiment_by_name("deltamem")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    parents = [r for r in runs if r.data.tags.get("deltamem.kind") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    pid = parents[0].info.run_id
    stage_runs = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == pid}
    assert {"prepare", "train-TSW", "evaluate", "report"} <= set(stage_runs)
    train = stage_runs["train-TSW"]
    assert train.data.tags["variant"] == "TSW" and train.data.tags["seed"] == "0"
    assert len(train.data.tags["mlflow.source.git.commit"]) == 40
    assert len(client.get_metric_history(train.info.run_id, "loss")) == 3  # the training curve, per step
    assert parents[0].data.params["train.optim.steps"] == "3"
    assert any(a.path == "report" for a in client.list_artifacts(pid))


def test_second_repro_is_a_no_op(project):
    out = sh(project, "dvc", "repro")
    assert ran(out) == set()
    assert "didn't change" in out or "up to date" in out


def test_changing_an_evaluation_parameter_reruns_only_evaluate_and_report(project):
    root, _ = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"]["bm25_k"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh(project, "dvc", "repro")
    assert ran(out) == {"evaluate", "report"}


def _commit(project, message: str) -> None:
    sh(project, "git", "add", "-A")
    sh(
        project,
        "git",
        "-c",
        "user.email=ci@example.com",
        "-c",
        "user.name=ci",
        "commit",
        "--allow-empty",
        "-qm",
        message,
    )


def _experiment(shown: object, name: str) -> dict:
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                if rev.get("name") == name:
                    return {**rev["data"], "rev": rev.get("rev") or rev["data"].get("rev")}
    raise AssertionError(f"experiment {name} not in dvc exp show --json")


def _metrics(data: dict) -> dict[str, dict]:
    return {f: m.get("data") or {} for f, m in (data.get("metrics") or {}).items()}


METRIC_FILES = {"results/train/TSW/metrics.json", "reports/metrics.json"}  # `metrics` in dvc.yaml
COMMITTED = {*METRIC_FILES, "results/metrics/evaluate.json"}  # git-tracked: in every experiment commit


def test_dvc_experiments_and_metrics_diff(project):
    root, _ = project
    _commit(project, "baseline")
    baseline = {f: json.loads((root / f).read_text()) for f in COMMITTED}
    out = sh(project, "dvc", "exp", "run", "-S", "evaluate.bm25_k=3", "-n", "bm25-3")
    assert ran(out) == {"evaluate", "report"}
    after = {f: json.loads((root / f).read_text()) for f in COMMITTED}
    sh(project, "git", "checkout", "-q", "--", ".")  # back to the baseline workspace
    sh(project, "dvc", "checkout", "-q")
    shown = _json_tail(sh(project, "dvc", "exp", "show", "--json", stdout_only=True))
    exp = _experiment(shown, "bm25-3")
    assert exp["params"]["params.yaml"]["data"]["evaluate"]["bm25_k"] == 3
    metrics = _metrics(exp)
    assert set(metrics) >= METRIC_FILES, f"metric files missing from the experiment: {METRIC_FILES - set(metrics)}"
    for f in METRIC_FILES:
        assert metrics[f] == after[f], f  # the experiment's own numbers, not the workspace's
    for f in COMMITTED:  # the experiment commit holds every file, evaluate.json included
        assert json.loads(sh(project, "git", "show", f"{exp['rev']}:{f}", stdout_only=True)) == after[f], f
    score = "TSW/deltamem_only/synthetic/score"
    assert isinstance(metrics["reports/metrics.json"][score], float)
    assert len(metrics["reports/metrics.json"]) < 40  # the readable DVC metrics file (reports/summary.json has all)

    # dvc exp apply brings the experiment's metrics into the workspace; metrics diff compares with HEAD
    sh(project, "dvc", "exp", "apply", "bm25-3")
    assert json.loads((root / "results/metrics/evaluate.json").read_text()) == after["results/metrics/evaluate.json"]
    diff = json.loads(sh(project, "dvc", "metrics", "diff", "--json", stdout_only=True))
    for f in METRIC_FILES:
        assert (f in diff) == (after[f] != baseline[f]), (f, diff)
    targeted = json.loads(
        sh(project, "dvc", "metrics", "diff", "--json", "--targets", "results/metrics/evaluate.json", stdout_only=True)
        or "{}"
    )
    assert ("results/metrics/evaluate.json" in targeted) == (
        after["results/metrics/evaluate.json"] != baseline["results/metrics/evaluate.json"]
    )
    sh(project, "git", "checkout", "-q", "--", ".")
    sh(project, "dvc", "checkout", "-q")
    assert json.loads((root / "reports/metrics.json").read_text()) == baseline["reports/metrics.json"]


def test_a_failing_stage_loses_no_computed_metrics(project):
    """A params typo makes train and evaluate fail; every metric survives or comes back without recomputing."""
    root, _ = project
    before = {f: (root / f).read_text() for f in COMMITTED}
    good = (root / "params.yaml").read_text()
    params = yaml.safe_load(good)
    params["train"]["optim"]["lr"] = -1.0  # invalid: train@TSW exits 2
    params["evaluate"]["bm25_k"] = 0  # invalid: evaluate exits 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _, env = project
    failed = subprocess.run(["dvc", "repro"], cwd=root, env=env, capture_output=True, text=True)
    assert failed.returncode != 0 and "train@TSW" in failed.stdout + failed.stderr
    failed = subprocess.run(["dvc", "repro", "-s", "evaluate"], cwd=root, env=env, capture_output=True, text=True)
    assert failed.returncode != 0 and "evaluate" in ran(failed.stdout)
    assert (root / "results/metrics/evaluate.json").read_text() == before["results/metrics/evaluate.json"]
    (root / "params.yaml").write_text(good)
    out = sh(project, "dvc", "repro")
    assert "train@TSW" not in ran(out), "a failed run forced a retrain"
    for f in METRIC_FILES:
        assert (root / f).read_text() == before[f], f
    assert json.loads((root / "results/metrics/evaluate.json").read_text()) == json.loads(
        before["results/metrics/evaluate.json"]
    )


def test_temp_experiment_runs_the_clones_code_and_logs_to_its_mlflow(project):
    """`dvc exp run --temp` runs in .dvc/tmp/exps/<tmp>: its processes import that copy (never the installed
    checkout) and log to the clone's MLflow database (not one deleted with the temporary folder)."""
    root, env = project
    _commit(project, "before the temp run")
    log = Path(env[probe.ENV])
    log.unlink(missing_ok=True)
    out = sh(project, "dvc", "exp", "run", "--temp", "-S", "report.bootstrap=300", "-n", "temp-run")
    assert "report" in ran(out) and "train@TSW" not in ran(out)
    imports = probe.read(log)
    assert imports and probe.kinds(imports) >= {"report"}
    for path, argv in imports:
        assert str(root / ".dvc" / "tmp" / "exps") in path, f"{argv} imported {path}"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("deltamem")
    runs = client.search_runs([exp.experiment_id], "tags.`dvc.exp_name` = 'temp-run'", max_results=50)
    assert any(r.info.run_name == "report" for r in runs)
    shown = _json_tail(sh(project, "dvc", "exp", "show", "--json", stdout_only=True))
    assert isinstance(
        _metrics(_experiment(shown, "temp-run"))["reports/metrics.json"]["TSW/deltamem_only/synthetic/score"], float
    )


def _json_tail(output: str) -> object:
    """The JSON document in ``output`` (dvc may print progress lines before it)."""
    start = min(i for i in (output.find("["), output.find("{")) if i >= 0)
    return json.loads(output[start:])
