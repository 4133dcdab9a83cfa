"""``train.launcher: ray``: 2 CPU Ray Train workers (gloo, DeepSpeed ZeRO-2) on a real local Ray whose every
listening socket is on 127.0.0.1 (:mod:`pipeline.ray_local`).

One run is "killed" after step 3 (checkpoint at step 2 in Ray Train's storage, one ZeRO shard per worker);
the next execution resumes from it, logs the per-step metrics of rank 0 into a real MLflow store, brings the
adapter back to the stage's outs, deletes the run's storage, and its adapter equals the single-process run
with the same global batch (≤ 1e-6 relative).
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from tests.pipeline.train.test_distributed import make_workspace

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None or importlib.util.find_spec("ray") is None,
        reason="needs DeepSpeed and Ray (the train extra)",
    ),
]


@pytest.fixture(scope="module")
def local_ray():
    from pipeline.train.ray_train import _start_local_ray

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    local = _start_local_ray(num_cpus=2)
    yield local
    local.shutdown()


def test_two_ray_workers_resume_and_match_the_single_process_run(local_ray, smol_tokenizer, tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from deltamem.backbones import load_backbone
    from pipeline import tracking
    from pipeline.params import load_section
    from pipeline.ray_local import is_loopback, listening_sockets
    from pipeline.train.ray_train import run_ray
    from pipeline.train.run import TrainParams, load_episodes
    from pipeline.train.trainer import TrainConfig, train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DELTAMEM_PIPELINE_STATE", str(tmp_path / "state.json"))
    mlflow.set_tracking_uri(uri)
    root = make_workspace(tmp_path / "ws", smol_tokenizer)
    p = load_section(root / "params.yaml", "train", TrainParams)
    p = p.model_copy(update={"launcher": "ray", "nproc": 2, "storage_path": str(tmp_path / "storage")})

    assert run_ray(p, "TSW", root, log_mlflow=False, stop_after=3) is None  # the "kill"
    sockets = listening_sockets(local_ray.processes())  # with the Train controller and workers started
    assert sockets and all(is_loopback(ip) for _, _, ip, _ in sockets), sockets
    (run_dir,) = (tmp_path / "storage").iterdir()
    assert sorted(c.name for c in run_dir.iterdir() if c.is_dir()) == ["step-000002"]  # step 3 died with it
    shards = sorted(f.name for f in (run_dir / "step-000002" / "deepspeed" / "state").glob("zero_pp_rank_*"))
    assert len(shards) == 2  # each worker's ZeRO partition, merged by Ray Train

    metrics = run_ray(p, "TSW", root, log_mlflow=True)
    assert metrics["steps"] == 4 and metrics["world_size"] == 2 and "val_answer_ce/written" in metrics
    assert json.loads((root / "results" / "train" / "TSW" / "metrics.json").read_text()) == metrics
    summary = json.loads((root / "models" / "TSW" / "training_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 4 and len(summary["history"]) == 4
    assert not run_dir.exists()  # the run's storage is only kept to resume a killed run

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(tracking.experiment_name()).experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["launcher"] == "ray"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert steps == [3, 4]  # rank 0's rows of this execution: it resumed at step 2
    assert run.data.metrics["final/steps"] == 4

    # the single-process twin: batch_size × workers, same seed, episodes and schedule
    model, tok = load_backbone(str(root / "backbone"))
    eps = load_episodes(p, root, tok, "train", None)
    cfg = TrainConfig(**{**p.optim.model_dump(), "batch_size": 2, "checkpoint_every": 0})
    ref = train(model, eps, tok.eos_token_id, p.deltamem_config("TSW"), cfg, tmp_path / "ref", progress=False)
    for got, want in zip(summary["history"], ref.history, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    a = load_file(str(root / "models" / "TSW" / "adapter" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "ref" / "adapter" / "adapter.safetensors"))
    assert sorted(a) == sorted(b)
    va = torch.cat([a[k].double().flatten() for k in sorted(a)])
    vb = torch.cat([b[k].double().flatten() for k in sorted(b)])
    assert float((va - vb).norm() / vb.norm()) <= 1e-6
