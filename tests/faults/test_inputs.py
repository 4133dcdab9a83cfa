"""Fault injection on every stage's inputs, probed as a new user would: each corrupt input is one line on
stderr naming the file (and key), exit status 2, no traceback, and no work started.

Complements tests/pipeline/eval/test_faults.py (corrupt adapters, splits, backbone weights, full
disk, killed evaluation) with the other corruptions: the params file itself (empty, a directory, a symlink
loop, not UTF-8, a huge line, no permission), a wrong type in every key of every section, the manifest, a
directory or a missing file where a file is expected, and a symlink loop in an artefact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

import pipeline.eval.runner as runner
import pipeline.stages.backbone
import pipeline.stages.evaluate
import pipeline.stages.prepare
import pipeline.stages.report
import pipeline.stages.train
from tests.pipeline.stages.test_evaluate import write_params

REPO = Path(__file__).resolve().parents[2]
SHIPPED = yaml.safe_load((REPO / "params.yaml").read_text())
STAGES = {
    "prepare": (pipeline.stages.prepare, "prepare"),
    "backbone": (pipeline.stages.backbone, "prepare_backbone"),
    "train": (pipeline.stages.train, "run_train"),
    "evaluate": (pipeline.stages.evaluate, "run_evaluate"),
    "report": (pipeline.stages.report, "run_report"),
}


def _no_work(*args, **kwargs):
    raise AssertionError("the stage started its work although its input is bad")


class _NoWorker:
    def __init__(self, *args, **kwargs):
        raise AssertionError("an evaluation worker was started although the inputs are bad")


def run_stage(stage: str, params: Path, capsys, monkeypatch, *, guard: bool = True) -> tuple[int, str]:
    """Stage ``stage``'s ``main`` in-process with its work function replaced by a tripwire; (exit, error line)."""
    module, work = STAGES[stage]
    if guard:
        monkeypatch.setattr(module, work, _no_work)
    monkeypatch.setattr(runner, "EvalWorker", _NoWorker)
    argv = ["--params", str(params)] + ([] if stage == "backbone" else ["--no-tracking"])
    argv += ["--variant", "TSW"] if stage == "train" else []
    capsys.readouterr()
    code = module.main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"{stage}: expected one error line, got:\n{err}"
    return code, lines[0]


# --- the params file itself ------------------------------------------------------------------------------
PARAMS_DAMAGE = ["empty", "directory", "symlink_loop", "not_utf8", "huge_line", "bad_yaml", "a_list", "no_permission"]


def damage_params(path: Path, damage: str) -> str:
    """Write a damaged params file at ``path``; returns a fragment the error must contain."""
    if damage == "empty":
        path.write_text("")
        return "section"
    if damage == "directory":
        path.mkdir()
        return "Is a directory"
    if damage == "symlink_loop":
        path.symlink_to(path)
        return "symbolic links"
    if damage == "not_utf8":
        path.write_bytes(yaml.safe_dump(SHIPPED).encode() + b"# \xff\xfe\n")
        return "not UTF-8"
    if damage == "huge_line":
        path.write_text(yaml.safe_dump(SHIPPED) + "junk: " + "x" * 5_000_000 + "\n  bad: [indent\n")
        return "invalid YAML"
    if damage == "bad_yaml":
        path.write_text("prepare:\n  datasets: [\n")
        return "invalid YAML"
    if damage == "a_list":
        path.write_text("- prepare\n- train\n")
        return "mapping"
    if os.geteuid() == 0:
        pytest.skip("root reads a file of mode 000")
    path.write_text(yaml.safe_dump(SHIPPED))
    path.chmod(0)
    return "Permission denied"


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("damage", PARAMS_DAMAGE)
def test_a_damaged_params_file_is_one_line_exit_2_in_every_stage(stage, damage, tmp_path, capsys, monkeypatch):
    params = tmp_path / "params.yaml"
    expected = damage_params(params, damage)
    code, line = run_stage(stage, params, capsys, monkeypatch)
    assert code == 2 and str(params) in line and expected in line, line


def _wrong(value):
    """A value of another type than ``value`` that no field of ours takes in its place."""
    if isinstance(value, dict):
        return [["not", "a", "mapping"]]
    if isinstance(value, list):
        return {"not": {"a": "list"}}
    return {"not": [value, "a scalar"]}


SECTION_KEYS = [(s, k) for s in STAGES for k in SHIPPED[s]]


@pytest.mark.parametrize(("section", "key"), SECTION_KEYS, ids=[f"{s}.{k}" for s, k in SECTION_KEYS])
def test_a_wrong_type_in_any_key_of_any_section_is_one_line_exit_2_naming_it(
    section, key, tmp_path, capsys, monkeypatch
):
    data = json.loads(json.dumps(SHIPPED))
    data[section][key] = _wrong(data[section][key])
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(data))
    code, line = run_stage(section, params, capsys, monkeypatch)
    assert code == 2 and str(params) in line and key in line, line


# --- artefacts where a file is expected: a directory, nothing, a symlink loop ----------------------------
def _evaluate(tmp_path, eval_root, capsys, monkeypatch, **overrides) -> tuple[int, str]:
    params = tmp_path / "params.yaml"
    write_params(params, eval_root, tmp_path / "out", **overrides)
    code, line = run_stage("evaluate", params, capsys, monkeypatch, guard=False)
    assert not list((tmp_path / "out").rglob("shard-*")), "a shard ran before the inputs were checked"
    return code, line


def _loop(path: Path) -> None:
    path.unlink() if path.is_file() else shutil.rmtree(path)
    path.symlink_to(path)


@pytest.mark.parametrize(
    ("artefact", "damage"),
    [
        ("adapter_weights", "directory"),
        ("adapter_weights", "missing"),
        ("adapter_weights", "symlink_loop"),
        ("adapter_config", "directory"),
        ("adapter_config", "a_list"),
        ("adapter_folder", "a_file"),
        ("backbone_config", "directory"),
        ("backbone_config", "missing"),
        ("backbone_folder", "a_file"),
        ("backbone_folder", "symlink_loop"),
        ("split", "directory"),
        ("split", "empty"),
        ("split", "symlink_loop"),
        ("split", "huge_line"),
        ("manifest", "empty"),
        ("manifest", "bad_json"),
        ("manifest", "directory"),
        ("manifest", "a_list"),
        ("manifest", "wrong_count_type"),
        ("out_dir", "a_file"),
    ],
)
def test_a_damaged_evaluation_artefact_is_one_line_exit_2_naming_it_before_any_shard(
    artefact, damage, eval_root, tmp_path, capsys, monkeypatch
):
    adapter, backbone, data = tmp_path / "adapter", tmp_path / "backbone", tmp_path / "prepared"
    shutil.copytree(eval_root / "models" / "TSW" / "adapter", adapter)
    shutil.copytree(eval_root / "models" / "backbone", backbone)
    shutil.copytree(eval_root / "data" / "prepared", data)
    split, manifest = data / "synthetic" / "test.jsonl", data / "manifest.json"
    records = len(split.read_text().splitlines())
    manifest.write_text(json.dumps({"datasets": {"synthetic": {"splits": {"test": {"examples": records}}}}}))
    target = {
        "adapter_weights": adapter / "adapter.safetensors",
        "adapter_config": adapter / "deltamem_adapter.json",
        "adapter_folder": adapter,
        "backbone_config": backbone / "config.json",
        "backbone_folder": backbone,
        "split": split,
        "manifest": manifest,
        "out_dir": tmp_path / "out",
    }[artefact]
    if damage == "directory":
        target.unlink()
        target.mkdir()
    elif damage == "missing":
        target.unlink()
    elif damage == "symlink_loop":
        _loop(target)
    elif damage == "a_file":
        shutil.rmtree(target, ignore_errors=True)
        target.write_text("not a folder\n")
    elif damage == "a_list":
        target.write_text("[1, 2]\n")
    elif damage == "empty":
        target.write_text("")
    elif damage == "bad_json":
        target.write_text('{"datasets": {"synthetic": ,}}')
    elif damage == "wrong_count_type":
        target.write_text(json.dumps({"datasets": {"synthetic": {"splits": {"test": {"examples": "many"}}}}}))
    elif damage == "huge_line":
        target.write_text(split.read_text() + '{"example_id": "' + "x" * 5_000_000 + "\n")
    code, line = _evaluate(
        tmp_path,
        eval_root,
        capsys,
        monkeypatch,
        backbone=str(backbone),
        data_dir=str(data),
        adapters={"TSW": str(adapter)},
    )
    if (artefact, damage) == ("adapter_config", "directory"):
        target = adapter  # "<folder>: not a δ-mem adapter (expected its files)"
    assert code == 2 and str(target) in line, line


# --- outputs are ordinary files: the umask's permissions, not mkdtemp/mkstemp's owner-only ones -------------
def _modes(root: Path) -> set[tuple[str, int]]:
    return {("d" if p.is_dir() else "f", p.stat().st_mode & 0o777) for p in [root, *root.rglob("*")]}


def test_prepare_outputs_get_ordinary_permissions(tmp_path):
    from pipeline.data.prepare import prepare
    from pipeline.params import PrepareParams

    umask = os.umask(0o022)
    try:
        entry = {"name": "synthetic", "synthetic": {"dialogues": {"train": 2, "test": 1}, "sessions": 2}}
        _, out = prepare(PrepareParams(datasets=[entry], out_dir="data/prepared"), base_dir=tmp_path)
    finally:
        os.umask(umask)
    assert _modes(out) == {("d", 0o755), ("f", 0o644)}


def test_report_outputs_get_ordinary_permissions(results_tree):
    from pipeline.report import ReportParams, run_report

    umask = os.umask(0o022)
    try:
        result = run_report(ReportParams(bootstrap=100, permutations=100), results_tree)
    finally:
        os.umask(umask)
    assert _modes(result.out_dir) == {("d", 0o755), ("f", 0o644)}  # was a 0700 folder (mkdtemp)


@pytest.mark.parametrize("blocked", ["models/TSW", "results", "results/train/TSW"])
def test_a_train_output_folder_that_cannot_be_written_is_refused_before_any_step(
    blocked, tmp_path, capsys, monkeypatch
):
    from pipeline.data.schema import write_split
    from pipeline.data.synthetic import config_from_options, generate_split

    cfg = config_from_options({"seed": 3, "dialogues": {"train": 2}, "sessions": 2, "facts_per_dialogue": 2})
    write_split(generate_split(cfg, "train"), tmp_path / "data" / "prepared" / "synthetic" / "train.jsonl")
    (tmp_path / "models" / "backbone").mkdir(parents=True)
    blocker = tmp_path / blocked
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file where a folder goes\n")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"backbone": "models/backbone", "limit_validation": 0}}))
    code, line = run_stage("train", params, capsys, monkeypatch)
    assert code == 2 and str(blocker) in line and "not a folder" in line, line


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("damage", ["config_directory", "truncated_weights", "empty_tokenizer"])
def test_a_damaged_backbone_folder_stops_training_in_one_line(damage, nproc, eval_root, tmp_path, capsys, monkeypatch):
    """The backbone folder exists but its files are broken: one line naming it, exit 2, before any rank or
    step starts (nproc 2 would launch torchrun ranks that each fail on it)."""
    from pipeline.data.schema import write_split
    from pipeline.data.synthetic import config_from_options, generate_split

    cfg = config_from_options({"seed": 3, "dialogues": {"train": 2}, "sessions": 1, "facts_per_dialogue": 1})
    write_split(generate_split(cfg, "train"), tmp_path / "data" / "prepared" / "synthetic" / "train.jsonl")
    backbone = tmp_path / "models" / "backbone"
    shutil.copytree(eval_root / "models" / "backbone", backbone)
    if damage == "config_directory":
        (backbone / "config.json").unlink()
        (backbone / "config.json").mkdir()
    elif damage == "truncated_weights":
        weights = next(backbone.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        (backbone / "tokenizer.json").write_text("")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"backbone": "models/backbone", "limit_validation": 0, "nproc": nproc}}))
    monkeypatch.setattr(pipeline.stages.train.subprocess, "call", _no_work)  # no torchrun either
    code, line = run_stage("train", params, capsys, monkeypatch, guard=False)
    assert code == 2 and str(backbone) in line, line
