"""The README's `deltamem chat` commands, run exactly as written (console script, from a project folder
where `dvc repro` left `models/TSW/adapter`), and the CLI's one-line input errors."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def readme_chat_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Online chat") :]
    section = section[: section.index("\n## ")]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the README's chat section has no bash block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip().startswith("deltamem chat")]


def _console() -> str:
    exe = shutil.which("deltamem") or str(Path(sys.executable).with_name("deltamem"))
    if not Path(exe).exists():
        pytest.skip("the deltamem console script is not installed (pip install -e .)")
    return exe


@pytest.fixture(scope="module")
def project(tmp_path_factory, embedded):
    """A folder laid out as after `dvc repro`: models/TSW/adapter for the embedded backbone."""
    from deltamem import DeltaMemConfig, attach_delta_mem, detach_delta_mem, save_adapter

    model, _ = embedded
    root = tmp_path_factory.mktemp("project")
    save_adapter(attach_delta_mem(model, DeltaMemConfig()), root / "models" / "TSW" / "adapter")
    detach_delta_mem(model)
    return root


def _run(args: list[str], cwd: Path, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # the checkout's code
    return subprocess.run(args, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=600, env=env)


def test_readme_chat_commands_work_as_written(project):
    commands = readme_chat_commands()
    assert len(commands) == 2, commands
    (project / "turns.jsonl").write_text(
        "\n".join(
            json.dumps(x)
            for x in [
                {"role": "user", "content": "I live in Tallinn.", "speaker": "Rosalind", "timestamp": "3 May 2024"},
                {"ask": "Where does Rosalind live?"},
                {"save": "sessions/rosalind"},
            ]
        )
    )
    for command in commands:
        argv = shlex.split(command)
        argv[0] = _console()
        out = _run(
            [*argv, "--max-new-tokens", "4"], project, stdin="I live in Oslo.\n? Where do I live?\n:save .\n:quit\n"
        )
        assert out.returncode == 0, (command, out.stderr[-2000:])
        if "--script" in argv:
            rows = [json.loads(x) for x in out.stdout.splitlines()]
            assert len(rows) == 1 and rows[0]["ask"] == "Where does Rosalind live?"
            meta = json.loads((project / "sessions" / "rosalind" / "session.json").read_text())
            assert meta["history"][0] == {
                "role": "user",
                "content": "I live in Tallinn.",
                "speaker": "Rosalind",
                "timestamp": "3 May 2024",
            }
        else:  # the REPL: ':save .' in the project folder is refused, and nothing there is touched
            assert "not saved" in out.stderr and "not a saved MemorySession" in out.stderr
            assert (project / "models" / "TSW" / "adapter").is_dir() and (project / "turns.jsonl").is_file()


def test_cli_input_errors_are_one_line_exit_2(project):
    exe = _console()
    bad = project / "bad.jsonl"
    for content, expect in [
        ('{"oops": 1}\n', "bad.jsonl:1: expected a line"),
        ('{"role": "narrator", "content": "x"}\n', "bad.jsonl:1: field 'role'"),
        ("{not json\n", "bad.jsonl:1: invalid JSON"),
    ]:
        bad.write_text(content)
        out = _run([exe, "chat", "--script", str(bad)], project)
        assert out.returncode == 2 and expect in out.stderr and "Traceback" not in out.stderr, out.stderr
    out = _run([exe, "chat", "--adapter", "models/NOPE", "--script", "turns.jsonl"], project)
    assert out.returncode == 2 and "--adapter: directory not found: models/NOPE" in out.stderr
    (project / "sessions" / "foreign").mkdir(parents=True, exist_ok=True)
    (project / "sessions" / "foreign" / "mine.txt").write_text("keep")
    bad.write_text('{"role": "user", "content": "hi"}\n{"save": "sessions/foreign"}\n')
    out = _run([exe, "chat", "--script", str(bad)], project)
    assert out.returncode == 2 and "not saved" in out.stderr
    assert (project / "sessions" / "foreign" / "mine.txt").read_text() == "keep"
