"""dvc.yaml's dependencies are exact: each stage depends on the project code it runs and on its raw data.

The project modules a stage runs are derived from its command: the entry module (``python -m pipeline.stages.X``),
then every ``import`` / ``from ... import`` reachable from it (lazy imports inside functions included,
package ``__init__`` files included), plus modules launched by name (``"-m", "pipeline.train.distributed"``
for torchrun workers). Every such file must lie under one of the stage's deps (a changed module must
rerun the stage), and every code dep must hold at least one of them (no stage reruns for code it never
runs, e.g. the backbone stage for training code).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("deltamem", "pipeline")
_MODULE = re.compile(r"(deltamem|pipeline)(\.\w+)+")
NON_PYTHON = {"train": {"cluster/deepspeed/zero2.json"}}  # read by path (pipeline.train.distributed)


def module_file(name: str) -> Path | None:
    """The repository file of module ``name`` (a package's ``__init__.py``), or None outside the project."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Project modules named by the imports (and ``-m`` string literals) of one file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE.fullmatch(node.value):
            names.add(node.value)  # a module launched by name: torchrun ... -m pipeline.train.distributed
    out = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            if module_file(".".join(parts[:i])):
                out.add(".".join(parts[:i]))
    return out


def closure(entry: str) -> set[Path]:
    """Files of every project module reachable from module ``entry``."""
    parts = entry.split(".")
    todo, seen = [".".join(parts[:i]) for i in range(1, len(parts) + 1)], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        f = module_file(name)
        if f is not None:
            todo.extend(imported_modules(f) - seen)
    return {f for f in map(module_file, seen) if f is not None}


def stage_entry(cmd: str) -> str:
    m = re.search(r"python\s+-m\s+([\w.]+)", cmd)
    assert m, f"cannot find the entry point in {cmd!r}"
    return m.group(1)


def stages() -> dict[str, dict]:
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: (s["do"] if "foreach" in s else s) for name, s in spec.items()}


def _deps(stage: dict) -> list[str]:
    return [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d.rstrip("/") or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("name", list(stages()))
def test_deps_cover_the_code_the_stage_runs(name):
    stage = stages()[name]
    files = {str(f.relative_to(REPO)) for f in closure(stage_entry(stage["cmd"]))}
    files |= NON_PYTHON.get(name, set())
    deps = _deps(stage)
    missing = sorted(f for f in files if not _covered(f, deps))
    assert not missing, f"stage {name}: runs {missing} but dvc.yaml does not list them (or a folder of them) as deps"
    code_deps = [d for d in deps if d.split("/")[0] in PACKAGES or d.startswith("cluster/")]
    unused = [d for d in code_deps if not any(_covered(f, [d]) for f in files)]
    assert not unused, f"stage {name}: depends on {unused} but never runs code from there"


def test_the_import_graph_sees_lazy_imports_and_torchrun_workers():
    """The checker itself: train reaches the torchrun worker module and the trainer; a miss would be silent."""
    files = {str(f.relative_to(REPO)) for f in closure(stage_entry(stages()["train"]["cmd"]))}
    assert "pipeline/train/distributed.py" in files and "pipeline/train/trainer.py" in files
    assert "pipeline/params.py" in files and "deltamem/__init__.py" in files
    prep = {str(f.relative_to(REPO)) for f in closure(stage_entry(stages()["prepare"]["cmd"]))}
    assert "pipeline/tracking.py" in prep  # imported inside a function
    assert not any(f.startswith("pipeline/train/") for f in prep)


def _local_sources(params: dict) -> list[str]:
    out = []
    for entry in params.get("prepare", {}).get("datasets", []):
        src = entry.get("source")
        if entry.get("enabled", True) and src and src != "hf" and not str(src).startswith("hf:"):
            out.append(str(src))
    return out


@pytest.mark.parametrize(
    "params_file", [REPO / "params.yaml", *sorted((REPO / "configs").glob("*.yaml"))], ids=lambda p: p.name
)
def test_raw_data_sources_are_deps_of_prepare(params_file):
    deps = _deps(stages()["prepare"])
    sources = _local_sources(yaml.safe_load(params_file.read_text()))
    outside = [s for s in sources if not _covered(str(Path(s)), deps)]
    assert not outside, f"{params_file.name}: raw sources {outside} are not under a dep of prepare {deps}"


# train keys that do not change a variant's outputs (threads: CPU threads; resume: whether to continue from a
# checkpoint; launcher: which process launcher runs the same training) or are listed per variant (variants.${key})
TRAIN_KEYS_NOT_DEPS = {"variants", "threads", "resume", "launcher"}
PARAMS_FILES = [REPO / "params.yaml", *sorted((REPO / "configs").glob("*.yaml"))]


@pytest.mark.parametrize("params_file", PARAMS_FILES, ids=lambda p: p.name)
def test_train_stage_params_match_the_params_files(params_file):
    """Every train key a params file sets reruns train@<variant> when changed; every listed key exists
    (DVC refuses to run a stage whose params dep is missing from params.yaml)."""
    listed = {p.split(".", 1)[1].split(".")[0] for p in stages()["train"]["params"] if p.startswith("train.")}
    present = set(yaml.safe_load(params_file.read_text())["train"])
    unlisted = sorted(present - TRAIN_KEYS_NOT_DEPS - listed)
    assert not unlisted, f"{params_file.name}: changing train.{unlisted} does not rerun train: add to dvc.yaml params"
    absent = sorted(listed - present)
    assert not absent, f"dvc.yaml lists train.{absent}, which {params_file.name} lacks: dvc repro would refuse to run"


def test_prepare_warns_about_sources_dvc_cannot_see(tmp_path, capsys):
    """A local source outside data/raw is not a dependency: the stage says so (once per source), and runs."""
    from pipeline.params import PrepareParams
    from pipeline.stages.prepare import sources_outside_raw

    (tmp_path / "data" / "raw" / "locomo").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "data" / "raw" / "linked").symlink_to(tmp_path / "elsewhere")
    p = PrepareParams.model_validate(
        {
            "datasets": [
                {"name": "locomo", "source": "data/raw/locomo/locomo10.json"},
                {"name": "ifeval", "source": "../shared/ifeval/input_data.jsonl"},
                {"name": "gpqa", "source": "data/raw/linked/gpqa.csv"},  # a symlink under data/raw is fine
                {"name": "qasper", "source": "hf"},
                {"name": "hotpotqa", "source": "/abs/hotpot", "enabled": False},
            ]
        }
    )
    assert sources_outside_raw(p, tmp_path) == ["../shared/ifeval/input_data.jsonl"]
