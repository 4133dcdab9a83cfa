"""A probe that records which checkout every process of a run imports (issue 11 item 10).

:func:`install` appends a few lines to a clone's ``pipeline/__init__.py``: when ``DELTAMEM_IMPORT_LOG`` is
set, each process that imports ``pipeline`` (stage commands, torchrun workers, Ray actors) appends the
file it imported and its command line to that log. A process that imported another checkout (one without
the probe, such as an editable install elsewhere) leaves no line, so :func:`kinds` misses it.
"""

from __future__ import annotations

from pathlib import Path

ENV = "DELTAMEM_IMPORT_LOG"
_PROBE = f'''

# --- test probe added by tests/e2e/probe.py (this clone only): which checkout each process imports
import os as _os
import sys as _sys

if _os.environ.get("{ENV}"):
    with open(_os.environ["{ENV}"], "a") as _log:
        _log.write(__file__ + "\\t" + " ".join(getattr(_sys, "orig_argv", _sys.argv)) + "\\n")
'''

# what a process's command line contains → the kind of process
KINDS = {
    "pipeline.stages.prepare": "prepare",
    "pipeline.stages.backbone": "backbone",
    "pipeline.stages.train": "train",
    "pipeline.train.distributed": "torchrun worker",
    "pipeline.stages.evaluate": "evaluate",
    "default_worker.py": "ray worker",
    "pipeline.stages.report": "report",
}


def install(root: Path) -> None:
    init = root / "pipeline" / "__init__.py"
    init.write_text(init.read_text() + _PROBE)


def read(log: Path) -> list[tuple[str, str]]:
    """(imported pipeline/__init__.py, command line) per process, in order."""
    if not log.is_file():
        return []
    return [tuple(line.split("\t", 1)) for line in log.read_text().splitlines() if "\t" in line]  # type: ignore[misc]


def kinds(entries: list[tuple[str, str]]) -> set[str]:
    return {kind for _, argv in entries for marker, kind in KINDS.items() if marker in argv}


def foreign(entries: list[tuple[str, str]], root: Path) -> list[str]:
    """Entries whose imported package is not ``root``'s."""
    mine = str((root / "pipeline" / "__init__.py").resolve())
    return [f"{path} ({argv})" for path, argv in entries if str(Path(path).resolve()) != mine]
