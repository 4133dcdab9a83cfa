"""Fault injection on the evaluate stage: every corrupt artefact is one line naming it, exit 2, found while
planning (before any shard runs, never retried); a killed evaluation recomputes only the missing shards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pipeline.eval.executors as executors
import pipeline.eval.inputs as inputs
import pipeline.eval.plan as planning
import pipeline.eval.runner as runner
from pipeline.stages.evaluate import main
from tests.pipeline.stages.test_evaluate import write_params

from .conftest import tiny_backbone

REPO = Path(__file__).resolve().parents[3]


class _NoWorker:
    def __init__(self, *args, **kwargs):
        raise AssertionError("a worker was started although the inputs are bad")


def run_stage(tmp_path, eval_root, capsys, monkeypatch, **overrides) -> tuple[int, str]:
    """The stage in-process on the tiny setup; returns (exit status, stderr)."""
    monkeypatch.setattr(executors, "EvalWorker", _NoWorker)
    params = tmp_path / "params.yaml"
    write_params(params, eval_root, tmp_path / "out", **overrides)
    capsys.readouterr()
    code = main(["--params", str(params), "--no-tracking"])
    err = capsys.readouterr().err
    assert not list((tmp_path / "out").rglob("shard-*")), "a shard ran before the inputs were checked"
    return code, err


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("evaluate: error: "), err
    assert "Traceback" not in err
    return lines[0]


def adapter_copy(eval_root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "adapters" / "TSW"
    shutil.copytree(eval_root / "models" / "TSW" / "adapter", dst)
    return dst


@pytest.mark.parametrize("damage", ["truncated", "random", "empty_config", "bad_json_config", "nan", "inf"])
def test_a_corrupt_adapter_is_one_line_exit_2_naming_the_file(damage, eval_root, tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file, save_file

    adapter = adapter_copy(eval_root, tmp_path)
    weights, config = adapter / "adapter.safetensors", adapter / "deltamem_adapter.json"
    if damage == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        named = weights
    elif damage == "random":
        weights.write_bytes(os.urandom(weights.stat().st_size))
        named = weights
    elif damage == "empty_config":
        config.write_text("")
        named = config
    elif damage == "bad_json_config":
        config.write_text('{"format": "deltamem-adapter",\n "config": {,}}')
        named = config
    else:
        tensors = load_file(str(weights))
        name = sorted(tensors)[0]
        tensors[name].view(-1)[3] = float("nan") if damage == "nan" else float("inf")
        save_file(tensors, str(weights))
        named = weights
    code, err = run_stage(tmp_path, eval_root, capsys, monkeypatch, adapters={"TSW": str(adapter)})
    line = one_line_error(err)
    assert code == 2 and str(named) in line, line
    if damage == "bad_json_config":
        assert "line 2 column" in line
    if damage in ("nan", "inf"):
        assert "non-finite" in line and name in line


def test_an_adapter_of_another_backbone_is_refused_while_planning(
    eval_root, smol_tokenizer, tmp_path, capsys, monkeypatch
):
    from deltamem import DeltaMemConfig, attach_delta_mem

    other = tiny_backbone(smol_tokenizer, seed=1)  # same shapes, other weights
    other.config._name_or_path = str(eval_root / "models" / "backbone")  # even recorded under our path
    attach_delta_mem(other, DeltaMemConfig(write_mode="TSW"))
    other.save_adapter(str(tmp_path / "foreign"))
    code, err = run_stage(tmp_path, eval_root, capsys, monkeypatch, adapters={"TSW": str(tmp_path / "foreign")})
    line = one_line_error(err)
    assert code == 2 and str(tmp_path / "foreign") in line and "different backbone" in line
    assert "layer0_q" in line
    assert "another backbone" not in line  # not "trained on another backbone (<our own path>)"


def test_the_worker_refuses_a_bad_adapter_once_without_retries(
    eval_root, smol_tokenizer, worker, tmp_path, monkeypatch
):
    """Where the planner cannot inspect the backbone (a hub id), the worker's load check is an input error:
    the shard is tried once, the stage stops with exit 2 semantics (EvalInputError)."""
    from transformers import LlamaForCausalLM

    from deltamem import DeltaMemConfig, attach_delta_mem

    cfg = tiny_backbone(smol_tokenizer).config
    cfg.hidden_size = 64  # another shape
    wide = attach_delta_mem(LlamaForCausalLM(cfg), DeltaMemConfig(write_mode="TSW"))
    wide.save_adapter(str(tmp_path / "wide"))
    p = runner.EvalParams(
        backbone=str(eval_root / "models" / "backbone"),
        data_dir=str(eval_root / "data" / "prepared"),
        out_dir=str(tmp_path / "out"),
        variants=["TSW"],
        adapters={"TSW": str(tmp_path / "wide")},
        conditions=["deltamem_only"],
        tasks=[{"dataset": "synthetic", "split": "test", "limit": 2}],
        workers=0,
        max_retries=3,
    )
    monkeypatch.setattr(planning, "check_adapter", lambda *a, **k: None)  # as for a hub backbone
    spec = runner.plan(p, eval_root)[0].shards[0]
    calls = []
    real = worker.run_payload

    def counting(s, attempt, *blobs):
        calls.append(attempt)
        return real(s, attempt, *blobs)

    monkeypatch.setattr(worker, "run_payload", counting)
    try:
        with pytest.raises(runner.EvalInputError, match=r"wide.*hidden_size"):
            runner.run_local([spec], p, "unused", lambda *a: None, worker)
    finally:
        worker.use_adapter(None)
    assert calls == [0]


def data_copy(eval_root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "prepared"
    shutil.copytree(eval_root / "data" / "prepared", dst)
    return dst


@pytest.mark.parametrize("damage", ["not_utf8", "bad_json", "bad_record", "truncated"])
def test_a_corrupt_prepared_split_is_one_line_exit_2_naming_the_file(damage, eval_root, tmp_path, capsys, monkeypatch):
    data = data_copy(eval_root, tmp_path)
    split = data / "synthetic" / "test.jsonl"
    lines = split.read_bytes().splitlines(keepends=True)
    (data / "manifest.json").write_text(
        json.dumps({"datasets": {"synthetic": {"splits": {"test": {"examples": len(lines)}}}}})
    )
    if damage == "not_utf8":
        split.write_bytes(b"".join(lines[:2]) + b'{"example_id": "\xff\xfe"}\n' + b"".join(lines[3:]))
    elif damage == "bad_json":
        split.write_bytes(b"".join(lines[:2]) + b'{"example_id": "x", oops}\n' + b"".join(lines[3:]))
    elif damage == "bad_record":
        split.write_bytes(b"".join(lines[:2]) + b'{"example_id": "x"}\n' + b"".join(lines[3:]))
    else:
        split.write_bytes(b"".join(lines[:5]))
    code, err = run_stage(tmp_path, eval_root, capsys, monkeypatch, data_dir=str(data))
    line = one_line_error(err)
    assert code == 2 and str(split) in line, line
    if damage == "not_utf8":
        assert "UTF-8" in line
    if damage == "bad_json":
        assert "line 3 column 21" in line, line
    if damage == "truncated":
        assert f"5 records, but {data / 'manifest.json'} lists {len(lines)}" in line


def test_an_output_folder_that_cannot_be_written_is_found_before_any_shard(eval_root, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(executors, "EvalWorker", _NoWorker)
    params = tmp_path / "params.yaml"
    write_params(params, eval_root, blocker / "results")
    code = main(["--params", str(params), "--no-tracking"])
    line = one_line_error(capsys.readouterr().err)
    assert code == 2 and "evaluate.out_dir" in line and str(blocker / "results") in line


def test_a_full_disk_is_found_before_any_shard(eval_root, tmp_path, capsys, monkeypatch):
    import errno

    real_write = os.write

    def full(fd, data):
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(".write-probe."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(inputs.os, "write", full)
    code, err = run_stage(tmp_path, eval_root, capsys, monkeypatch)
    line = one_line_error(err)
    assert code == 2 and "No space left on device" in line and str(tmp_path / "out") in line
    assert not [f for f in (tmp_path / "out").iterdir() if f.name.startswith(".write-probe.")]


def test_an_unknown_task_is_one_line_exit_2(eval_root, tmp_path, capsys, monkeypatch):
    code, err = run_stage(
        tmp_path, eval_root, capsys, monkeypatch, tasks=[{"dataset": "synthetic", "split": "test", "task": "nope"}]
    )
    line = one_line_error(err)
    assert code == 2 and "unknown task 'nope'" in line


@pytest.mark.slow
def test_a_killed_evaluation_recomputes_only_the_missing_shards(eval_root, tmp_path):
    params, out = tmp_path / "params.yaml", tmp_path / "out"
    write_params(
        params,
        eval_root,
        out,
        conditions=["base_no_context", "deltamem_only", "base_full_context"],
        tasks=[{"dataset": "synthetic", "split": "test"}],
        shard_conversations=1,
        max_new_tokens_cap=6,
    )  # 3 units × 4 shards
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pipeline.stages.evaluate", "--params", str(params), "--no-tracking"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while len(list(out.rglob("shard-*.meta.json"))) < 3:
            assert proc.poll() is None, "the stage ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = {
        f.name.split(".")[0] + "@" + str(f.parent.parent.relative_to(out)): f.stat().st_mtime_ns
        for f in out.rglob("shard-*.meta.json")
    }
    assert 3 <= len(done) < 12
    p = runner.EvalParams(**yaml_section(params))
    summary = runner.run_evaluate(p, params.parent, progress=False)
    assert len(summary.reused) == len(done) and len(summary.computed) == 12 - len(done)
    for f in out.rglob("shard-*.meta.json"):
        key = f.name.split(".")[0] + "@" + str(f.parent.parent.relative_to(out))
        if key in done:
            assert f.stat().st_mtime_ns == done[key], f"{key} was recomputed"
    assert not list(out.rglob(".*.tmp"))  # no temporary file left by the kill survives the rerun


def yaml_section(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())["evaluate"]


@pytest.mark.parametrize("damage", ["empty_config", "truncated_weights"])
def test_a_corrupt_backbone_folder_is_one_line_exit_2_naming_the_file(damage, eval_root, tmp_path, capsys, monkeypatch):
    backbone = tmp_path / "backbone"
    shutil.copytree(eval_root / "models" / "backbone", backbone)
    if damage == "empty_config":
        named = backbone / "config.json"
        named.write_text("")
    else:
        named = next(backbone.glob("*.safetensors"))
        named.write_bytes(named.read_bytes()[:4096])
    code, err = run_stage(tmp_path, eval_root, capsys, monkeypatch, backbone=str(backbone))
    line = one_line_error(err)
    assert code == 2 and str(named) in line, line


def test_a_params_file_that_is_not_utf8_is_one_line_exit_2(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_bytes(b'evaluate:\n  workers: 0\n  out_dir: "\xff\xfe"\n')
    assert main(["--params", str(params), "--no-tracking"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert str(params) in line and "not UTF-8" in line
