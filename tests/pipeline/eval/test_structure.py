"""The shape of ``pipeline/``: no import circle, evaluation modules of a readable size, Ray in one module,
one atomic writer (static checks over the source: fast, no imports)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PIPELINE = Path(__file__).resolve().parents[3] / "pipeline"


def _module_name(f: Path, root: Path) -> str:
    return ".".join(f.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")


def _imports(f: Path, root: Path, mods: set[str]) -> set[str]:
    """Modules of ``mods`` that ``f`` imports, at module level or in a function (TYPE_CHECKING left out)."""
    tree = ast.parse(f.read_text(encoding="utf-8"))
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    name = _module_name(f, root)
    pkg = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
    deps: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names}
        elif isinstance(node, ast.Import):
            deps |= {a.name for a in node.names}
    return {d for d in deps if d in mods and d != name}


def import_cycles(root: Path) -> list[list[str]]:
    """The strongly connected components with more than one module of the package ``root`` (Tarjan)."""
    mods = {_module_name(f, root): f for f in sorted(root.rglob("*.py"))}
    graph = {m: _imports(f, root, set(mods)) for m, f in mods.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    pkg = tmp_path / "pipeline"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pipeline.b import x\n")
    (pkg / "b.py").write_text("def f():\n    from pipeline import a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipeline import a\n")
    assert import_cycles(pkg) == [["pipeline.a", "pipeline.b"]]


def test_pipeline_has_no_import_cycle():
    assert import_cycles(PIPELINE) == []


@pytest.mark.parametrize("f", sorted((PIPELINE / "eval").glob("*.py")), ids=lambda f: f.name)
def test_evaluation_modules_stay_readable(f):
    assert len(f.read_text(encoding="utf-8").splitlines()) <= 400, f"{f.name}: over ~400 lines; split it by phase"


def test_only_the_executors_import_ray():
    importers = sorted(
        f.name for f in (PIPELINE / "eval").rglob("*.py") if any(m.split(".")[0] == "ray" for m in _raw_imports(f))
    )
    assert importers == ["executors.py"]


def _raw_imports(f: Path) -> set[str]:
    tree = ast.parse(f.read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module)
    return out


def test_temporary_files_are_made_only_by_the_common_writers():
    """Atomic writes have one behaviour: ``pipeline.common`` makes every temporary sibling. The others are
    not writes of an output: the write probe of ``check_writable`` and a Ray Train worker's scratch folder.
    (The training checkpoint, written by several ranks into one folder, keeps its own protocol.)"""
    makers = sorted(
        str(f.relative_to(PIPELINE))
        for f in PIPELINE.rglob("*.py")
        if any(s in f.read_text(encoding="utf-8") for s in ("mkstemp(", "mkdtemp(", ".tmp-{os.getpid()}"))
    )
    assert makers == ["common.py", "eval/inputs.py", "train/ray_train.py"], makers
