"""The train/backbone stages around the loop: nproc auto, dtype, input errors, checkpoint write failures,
permissions, the backbone checksum, stale MLflow runs (a real sqlite store)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltamem import DeltaMemConfig
from pipeline.backbone import InputError, resolve_backbone
from pipeline.train.run import TrainParams, resolve_dtype, resolve_nproc
from pipeline.train.trainer import CheckpointError, TrainConfig, train
from tests.conftest import tiny_model

REPO = Path(__file__).resolve().parents[3]


def params(**kw) -> TrainParams:
    optim = kw.pop("optim", {})
    return TrainParams.model_validate({"optim": {"batch_size": 1, "grad_accum": 32, **optim}, **kw})


# --- nproc: auto ------------------------------------------------------------------------------------------
def test_nproc_auto_takes_the_visible_gpus_and_keeps_the_global_batch(capsys):
    p = resolve_nproc(params(nproc="auto"), available_gpus=8)
    assert (p.nproc, p.optim.grad_accum) == (8, 4)
    assert p.optim.batch_size * p.optim.grad_accum * p.nproc == 32
    assert "grad_accum 32 → 4 per process; global batch 32" in capsys.readouterr().err
    one = resolve_nproc(params(nproc="auto"), available_gpus=1)
    assert (one.nproc, one.optim.grad_accum) == (1, 32)
    cpu = resolve_nproc(params(nproc="auto", device="cpu"), available_gpus=8)
    assert (cpu.nproc, cpu.optim.grad_accum) == (1, 32)  # CPU: one process (its threads use the cores)


def test_nproc_auto_never_changes_the_global_batch_when_the_gpus_do_not_divide_it():
    with pytest.warns(UserWarning, match="does not divide"):
        p = resolve_nproc(params(nproc="auto"), available_gpus=3)
    assert (p.nproc, p.optim.grad_accum) == (2, 16)


def test_an_impossible_nproc_is_an_input_error():
    with pytest.raises(InputError, match=r"train\.nproc=8 but 2 GPU\(s\) are visible"):
        resolve_nproc(params(nproc=8), available_gpus=2)
    with pytest.raises(InputError, match=r"train\.nproc=64 but this machine has 4 CPU core\(s\)"):
        resolve_nproc(params(nproc=64, device="cpu"), available_gpus=0, cpus=4)
    with pytest.raises(ValueError, match="nproc"):
        params(nproc=0)


def test_dtype_from_params_with_one_default():
    assert resolve_dtype(params(), torch.device("cpu")) == "float32"
    assert resolve_dtype(params(), torch.device("cuda")) == "bfloat16"
    assert resolve_dtype(params(dtype="float16"), torch.device("cpu")) == "float16"
    with pytest.raises(ValueError, match="dtype"):
        params(dtype="int8")


# --- the stages' input errors ------------------------------------------------------------------------------
def _stage(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", f"pipeline.stages.{script.removesuffix('.py')}", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )


def test_train_stage_missing_split_and_backbone_are_one_line_exit_2(tmp_path):
    (tmp_path / "params.yaml").write_text("train: {backbone: models/backbone, limit_validation: 0}\n")
    r = _stage("train.py", "--params", "params.yaml", "--variant", "TSW", "--no-tracking", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr  # the backbone is checked first
    assert r.stderr.strip().count("\n") == 0 and "train.backbone:" in r.stderr and "models/backbone" in r.stderr
    (tmp_path / "models" / "backbone").mkdir(parents=True)
    r = _stage("train.py", "--params", "params.yaml", "--variant", "TSW", "--no-tracking", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "train.jsonl: prepared split not found" in r.stderr
    split = tmp_path / "data" / "prepared" / "synthetic" / "train.jsonl"
    split.parent.mkdir(parents=True)
    split.write_text('{"id": "a", "broken\n')
    r = _stage("train.py", "--params", "params.yaml", "--variant", "TSW", "--no-tracking", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and str(split) in r.stderr
    r = _stage("train.py", "--params", "params.yaml", "--variant", "XYZ", cwd=tmp_path)
    assert r.returncode == 2 and "unknown variant 'XYZ'" in r.stderr


def test_backbone_stage_missing_local_path_is_one_line_exit_2(tmp_path):
    (tmp_path / "params.yaml").write_text("backbone: {name_or_path: ./no/such/model}\n")
    r = _stage("backbone.py", "--params", "params.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "backbone.name_or_path" in r.stderr and "no/such/model" in r.stderr
    assert "no such folder" in r.stderr and r.stderr.count("\n") == 1


def test_local_looking_paths_never_become_hub_requests(tmp_path, monkeypatch):
    import deltamem.backbones.loading as loading

    monkeypatch.setattr(loading, "hub_reachable", lambda *a, **k: (True, ""))  # a hub id passes when online
    (tmp_path / "models").mkdir()
    for name in ("/abs/missing", "./rel", "../up", "a/b/c", "models/backbone"):
        with pytest.raises(InputError, match=r"does not exist|no such folder"):
            resolve_backbone(name, tmp_path, "f", local_names=("models/backbone",))
    assert resolve_backbone("Qwen/Qwen3-8B", tmp_path, "f") == "Qwen/Qwen3-8B"
    assert resolve_backbone("embedded", tmp_path, "f") == "embedded"
    (tmp_path / "models" / "m").mkdir()
    assert resolve_backbone("models/m", tmp_path, "f") == str(tmp_path / "models" / "m")


# --- checkpoints, permissions, the frozen backbone ---------------------------------------------------------
@pytest.fixture(scope="module")
def episodes(smol_tokenizer):
    from pipeline.data.synthetic import config_from_options, generate_split
    from pipeline.data.tokenize import Packer

    cfg = config_from_options({"seed": 3, "dialogues": {"train": 2}, "sessions": 2, "facts_per_dialogue": 2})
    packer = Packer(smol_tokenizer, write_length=128, read_length=48, overflow="truncate")
    return [packer.pack(e) for e in generate_split(cfg, "train")]


def small(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 4, "batch_size": 2, "grad_accum": 1, "lr": 5e-3, "checkpoint_every": 1, **kw})


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4054"),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
)
def test_a_failed_checkpoint_write_cleans_up_and_names_path_and_reason(
    episodes, smol_tokenizer, tmp_path, monkeypatch, error
):
    import pipeline.train.trainer as trainer

    calls = {"n": 0}
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] >= 2:  # the second checkpoint hits a full disk
            raise error
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(trainer.torch, "save", full_disk)
    monkeypatch.setattr(trainer.shutil, "disk_usage", lambda p: type("U", (), {"free": 1024})())
    model = tiny_model("llama", attn=None, vocab=len(smol_tokenizer), max_positions=256)
    with pytest.raises(CheckpointError) as info:
        train(model, episodes, smol_tokenizer.eos_token_id, DeltaMemConfig(), small(), tmp_path, progress=False)
    message = str(info.value)
    assert str(tmp_path / "checkpoints" / ".tmp-step-000002") in message and "no space left on device" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001"]  # nothing half-written


def test_resume_is_logged_and_outputs_get_ordinary_permissions(episodes, smol_tokenizer, tmp_path, capfd):
    pad, cfg = smol_tokenizer.eos_token_id, small(checkpoint_every=2)
    new = lambda: tiny_model("llama", attn=None, vocab=len(smol_tokenizer), max_positions=256)  # noqa: E731
    train(new(), episodes, pad, DeltaMemConfig(), cfg, tmp_path, stop_after=3, progress=False)
    capfd.readouterr()
    train(new(), episodes, pad, DeltaMemConfig(), cfg, tmp_path, progress=False)
    assert f"resumed from {tmp_path / 'checkpoints' / 'step-000002'} at step 2 of 4" in capfd.readouterr().err
    umask = os.umask(0)
    os.umask(umask)
    adapter = tmp_path / "adapter"
    assert adapter.stat().st_mode & 0o777 == 0o777 & ~umask
    for f in adapter.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


def test_a_changed_backbone_is_caught_by_the_checksum(monkeypatch):
    from pipeline.train.run import _checksum

    model = tiny_model("llama", attn=None)
    frozen = list(model.parameters())
    before = _checksum(frozen)
    assert torch.equal(_checksum(frozen), before)
    with torch.no_grad():
        frozen[3].view(-1)[5] += 1e-3
    assert not torch.equal(_checksum(frozen), before)


# --- MLflow: a killed stage's run --------------------------------------------------------------------------
def test_a_killed_stages_run_is_closed_killed_by_the_next_execution(tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline import tracking
    from pipeline.train.run import _process_tags, close_stale_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DELTAMEM_PIPELINE_STATE", str(tmp_path / "state.json"))
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.create_experiment(tracking.experiment_name())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = _process_tags()
    ghost = {**mine, "deltamem.pid": str(dead.pid)}
    runs = {}
    for label, tags in [("killed", ghost), ("alive", mine), ("other-host", {**ghost, "deltamem.host": "elsewhere"})]:
        runs[label] = client.create_run(exp, tags={"stage": "train", "variant": "TSW", **tags}).info.run_id
    assert close_stale_runs("TSW") == [runs["killed"]]
    assert client.get_run(runs["killed"]).info.status == "KILLED"
    assert client.get_run(runs["alive"]).info.status == "RUNNING"
    assert client.get_run(runs["other-host"]).info.status == "RUNNING"


def test_backbone_stage_writes_an_ordinary_folder(smol_tokenizer, tmp_path):
    from pipeline.backbone import BackboneParams, prepare_backbone

    src = tmp_path / "src"
    tiny_model("llama", attn=None, vocab=len(smol_tokenizer)).save_pretrained(src)
    smol_tokenizer.save_pretrained(src)
    out = prepare_backbone(BackboneParams(name_or_path=str(src), out_dir="models/backbone"), tmp_path)
    assert out == tmp_path / "models" / "backbone" and (out / "config.json").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    assert all(f.stat().st_mode & 0o777 == 0o666 & ~umask for f in out.iterdir())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary sibling left


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (a real full disk); skipped where mounting is not allowed (not root, no CAP_SYS_ADMIN)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_real_full_disk_during_a_checkpoint(episodes, smol_tokenizer, tmp_path, small_tmpfs):
    import shutil

    pad = smol_tokenizer.eos_token_id
    new = lambda: tiny_model("llama", attn=None, vocab=len(smol_tokenizer), max_positions=256)  # noqa: E731
    cfg = small(checkpoint_every=1, keep_checkpoints=1)
    train(new(), episodes, pad, DeltaMemConfig(), cfg, tmp_path / "probe", stop_after=1, progress=False)
    files = [f for f in (tmp_path / "probe" / "checkpoints").rglob("*") if f.is_file()]
    size = sum(-(-f.stat().st_size // 4096) * 4096 for f in files)  # tmpfs allocates whole pages
    # leave room for one checkpoint and a half: the second one (written before the first is removed) fails
    free = shutil.disk_usage(small_tmpfs).free
    (small_tmpfs / "filler").write_bytes(b"\0" * max(0, free - int(1.5 * size)))
    with pytest.raises(CheckpointError, match="no space left on device") as info:
        train(new(), episodes, pad, DeltaMemConfig(), cfg, small_tmpfs / "run", progress=False)
    assert ".tmp-step-000002" in str(info.value)
    assert sorted(p.name for p in (small_tmpfs / "run" / "checkpoints").iterdir()) == ["step-000001"]


# --- the Ray launcher's planning (no cluster: its resources are given) -------------------------------------
def test_ray_workers_are_fitted_to_the_cluster_or_refused(monkeypatch):
    import ray

    from pipeline.train.ray_train import scaling, worker_error

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 8.0})
    p, scale = scaling(params(launcher="ray", nproc="auto"))
    assert scale == {"num_workers": 8, "use_gpu": True, "resources_per_worker": {"CPU": 1.0, "GPU": 1.0}}
    assert p.optim.grad_accum == 4  # global batch 32 kept
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    p, scale = scaling(params(launcher="ray", nproc="auto"))
    assert (scale["num_workers"], scale["use_gpu"], p.optim.grad_accum) == (1, False, 32)
    with pytest.raises(InputError, match=r"train\.nproc=3 Ray Train workers × 1 CPU each, but the cluster has 2 CPU"):
        scaling(params(launcher="ray", nproc=3))
    with pytest.raises(InputError, match="GPU"):
        scaling(params(launcher="ray", nproc=1, ray={"use_gpu": True}))
    err = RuntimeError(
        "Training failed:\n[Rank 0]\npipeline.train.trainer.CheckpointError: /s/.tmp-step-000002: no space"
    )
    assert isinstance(worker_error(err), CheckpointError) and str(worker_error(err)) == "/s/.tmp-step-000002: no space"
    other = ValueError("x")
    assert worker_error(other) is other
