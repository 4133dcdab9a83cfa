"""The ``deltamem`` console command (pipeline/cli.py): verbs, their --help, and delegation to the stage mains."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import cli

REPO = Path(__file__).resolve().parents[2]
VERBS = ["chat", "prepare", "backbone", "train", "eval", "report", "submit"]
# options each verb's --help must list (the stage modules' options, for the delegating verbs)
OPTIONS = {
    "chat": ["--backbone", "--adapter", "--script", "--session", "--system", "--max-new-tokens", "--dtype"],
    "prepare": ["--params", "--out", "--no-tracking"],
    "backbone": ["--params"],
    "train": ["--params", "--variant", "--nproc", "--no-tracking"],
    "eval": ["--params", "--workers", "--no-tracking", "--no-resume"],
    "report": ["--params", "--no-tracking"],
    "submit": ["--entrypoint", "--address", "--working-dir", "--env", "--no-wait", "--gpus", "--dry-run", "--timeout"],
}


def _console_script() -> str:
    exe = Path(sys.executable).with_name("deltamem")
    if not exe.is_file():
        pytest.skip("the deltamem console script is not installed (pip install -e .)")
    return str(exe)


def _run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([_console_script(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_console_script_points_at_pipeline_cli():
    text = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^deltamem = "pipeline\.cli:main"$', text, re.M), "pyproject [project.scripts] deltamem"


def test_top_level_help_lists_every_verb():
    res = _run("--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: deltamem")
    for verb in VERBS:
        assert re.search(rf"^\s+{verb}\s+\S", res.stdout, re.M), f"{verb} missing from deltamem --help:\n{res.stdout}"


@pytest.mark.parametrize("verb", VERBS)
def test_verb_help_lists_its_options(verb):
    res = _run(verb, "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"usage: deltamem {verb}"), res.stdout[:200]
    for opt in OPTIONS[verb]:
        assert opt in res.stdout, f"deltamem {verb} --help lacks {opt}:\n{res.stdout}"


def test_unknown_verb_is_an_error():
    res = _run("frobnicate")
    assert res.returncode == 2
    assert "invalid choice" in res.stderr


@pytest.mark.parametrize("verb", VERBS)
def test_every_option_has_help_text(verb, monkeypatch):
    """Every option of every verb (and of the stage parsers it delegates to) has a help string."""
    parsers: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.parse_known_args

    def recording(self, args=None, namespace=None):
        parsers.append(self)
        return original(self, args, namespace)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", recording)
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exc:
        cli.main([verb, "--help"])
    assert exc.value.code == 0
    undocumented = [
        (p.prog, a.option_strings)
        for p in parsers
        for a in p._actions
        if a.option_strings and not isinstance(a, argparse._HelpAction) and not a.help
    ]
    assert parsers and not undocumented, f"options without help: {undocumented}"


@pytest.mark.parametrize(
    ("verb", "script"),
    [("prepare", "prepare"), ("backbone", "backbone"), ("train", "train"), ("eval", "evaluate"), ("report", "report")],
)
def test_stage_verbs_delegate_to_the_stage_mains(verb, script, monkeypatch):
    calls = []

    def fake_main(argv):
        calls.append((argv, sys.argv[0]))
        return 7

    monkeypatch.setattr(cli, "stage_main", lambda name: (calls.append(name), fake_main)[1])
    assert cli.main([verb, "--params", "p.yaml", "--no-tracking"]) == 7
    assert calls == [script, (["--params", "p.yaml", "--no-tracking"], f"deltamem {verb}")]


def test_stage_mains_are_the_stage_modules_mains():
    train = cli.load_stage("train")
    assert Path(train.__file__) == REPO / "pipeline" / "stages" / "train.py"
    assert cli.stage_main("evaluate") is cli.load_stage("evaluate").main


def test_train_runs_the_stage_main_for_real(tmp_path, capsys):
    """Bad params give the stage's own error and exit status 2 (no mock: the real pipeline.stages.train main)."""
    code = cli.main(["train", "--variant", "TSW", "--params", str(tmp_path / "missing.yaml"), "--no-tracking"])
    assert code == 2
    assert "error" in capsys.readouterr().err


def test_chat_delegates_to_the_library_cli(monkeypatch):
    import deltamem.cli

    seen = []
    monkeypatch.setattr(deltamem.cli, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["chat", "--adapter", "models/TSW"]) == 0
    assert seen == [["chat", "--adapter", "models/TSW"]]


def test_submit_dry_run_prints_the_ray_command():
    res = _run("submit", "--dry-run", "--address", "http://10.0.0.1:8265", "--entrypoint", "dvc repro evaluate")
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip()
    assert line.startswith("ray job submit --address http://10.0.0.1:8265 --working-dir . --runtime-env-json ")
    assert line.endswith("-- bash -c 'dvc config --local core.no_scm true && dvc repro evaluate'")


def test_library_does_not_import_pipeline():
    offenders = [
        str(p.relative_to(REPO))
        for p in (REPO / "deltamem").rglob("*.py")
        if re.search(r"^\s*(from|import)\s+pipeline\b", p.read_text(), re.M)
    ]
    assert not offenders
