"""DeepSpeed ZeRO-2 data-parallel training: 2 CPU ranks (gloo) under torchrun vs the single-process trainer.

The launched tests train a tiny random Llama (the embedded tokenizer's vocabulary, hidden 32, 2 layers) on
synthetic episodes in a real ``torchrun --nproc_per_node 2`` subprocess; they need DeepSpeed (the ``train``
extra) and are skipped without it. The config and loss tests run in-process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltamem import DeltaMemConfig, attach_delta_mem
from pipeline.train.distributed import DEFAULT_DS_CONFIG, EpisodeObjective, deepspeed_config
from pipeline.train.trainer import TrainConfig, collate_episodes, episode_forward
from tests.conftest import tiny_model
from tests.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[3]
OPTIM = {
    "steps": 4,
    "batch_size": 1,  # per rank: the single-process twin uses 2
    "grad_accum": 2,
    "lr": 5e-3,
    "warmup_ratio": 0.2,
    "beta_sparsity_weight": 1.0,  # large, so that a wrong cross-rank β term would show in the losses
    "checkpoint_every": 2,
    "keep_checkpoints": 2,
}
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed (DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed==0.19.8)",
)


def tiny(vocab: int, seed: int = 0):
    """A 2-layer random Llama over the embedded tokenizer's vocabulary (default attention)."""
    return tiny_model("llama", attn=None, seed=seed, vocab=vocab, max_positions=512)


# --- the DeepSpeed config ------------------------------------------------------------------------------
def test_shipped_config_is_filled_from_params():
    cfg = TrainConfig(batch_size=4, grad_accum=8, max_grad_norm=0.5)
    ds = deepspeed_config(DEFAULT_DS_CONFIG, cfg, world_size=8)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 8
    assert ds["train_batch_size"] == 4 * 8 * 8
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert "auto" not in json.dumps(ds)


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ({"gradient_accumulation_steps": 3}, "gradient_accumulation_steps=3"),
        ({"optimizer": {"type": "AdamW"}}, "'optimizer'"),
        ({"bf16": {"enabled": True}}, r"bf16\.enabled"),
        ({"zero_optimization": {"stage": 3}}, "stage=3"),
    ],
)
def test_config_conflicts_are_refused(template, match):
    with pytest.raises(ValueError, match=match):
        deepspeed_config(template, TrainConfig(grad_accum=2), world_size=2)


# --- the loss ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def episodes(smol_tokenizer):
    from pipeline.data.synthetic import config_from_options, generate_split
    from pipeline.data.tokenize import Packer

    cfg = config_from_options({"seed": 3, "dialogues": {"train": 2}, "sessions": 2, "facts_per_dialogue": 2})
    packer = Packer(smol_tokenizer, write_length=256, read_length=64, overflow="truncate")
    return [packer.pack(e) for e in generate_split(cfg, "train")]


def test_one_rank_objective_has_the_trainer_gradient(episodes, smol_tokenizer):
    model = attach_delta_mem(tiny(len(smol_tokenizer)), DeltaMemConfig())
    params = model.delta_mem.parameters()
    cfg = TrainConfig(beta_sparsity_weight=1.0)
    batch = collate_episodes(episodes[:3], smol_tokenizer.eos_token_id)
    loss, ce, _ = episode_forward(model, batch, "written", cfg)
    want = torch.autograd.grad(loss, params)
    objective = EpisodeObjective(model, cfg)
    got = torch.autograd.grad(objective(batch), params)
    assert objective.last["loss"] == pytest.approx(float(loss.detach()), rel=1e-6)
    assert objective.last["answer_ce"] == pytest.approx(float(ce.detach()), rel=1e-6)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


# --- 2 CPU ranks under torchrun ------------------------------------------------------------------------
def launch(root: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",  # = torchrun
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "pipeline.train.distributed",
        "--params",
        str(root / "params.yaml"),
        "--variant",
        "TSW",
        "--no-tracking",
        "--no-progress",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    r = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, f"{r.stdout[-4000:]}\n{r.stderr[-6000:]}"
    return r


def make_workspace(root: Path, tokenizer) -> Path:
    import yaml

    from pipeline.data.schema import write_split
    from pipeline.data.synthetic import config_from_options, generate_split

    tiny(len(tokenizer)).save_pretrained(root / "backbone")
    tokenizer.save_pretrained(root / "backbone")
    synth = config_from_options(
        {"seed": 3, "dialogues": {"train": 3, "validation": 1}, "sessions": 2, "facts_per_dialogue": 2}
    )
    for split in ("train", "validation"):
        write_split(generate_split(synth, split), root / "data" / "synthetic" / f"{split}.jsonl")
    train = {
        "backbone": "backbone",
        "data_dir": "data",
        "dataset": "synthetic",
        "limit_validation": 2,
        "write_length": 256,
        "read_length": 64,
        "device": "cpu",
        "variants": {"TSW": {"write_mode": "TSW"}},
        "optim": OPTIM,
    }
    (root / "params.yaml").write_text(yaml.safe_dump({"train": train}))
    return root


@pytest.fixture(scope="module")
def full_run(smol_tokenizer, tmp_path_factory) -> Path:
    """A complete 2-rank run (4 steps, checkpoints every 2)."""
    root = make_workspace(tmp_path_factory.mktemp("zero2"), smol_tokenizer)
    launch(root)
    return root


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter.safetensors"))


@pytest.mark.slow
@needs_deepspeed
def test_two_cpu_ranks_match_the_single_process_run(full_run, tmp_path):
    from deltamem import load_adapter
    from deltamem.backbones import load_backbone
    from pipeline.params import load_section
    from pipeline.train.run import TrainParams, load_episodes
    from pipeline.train.trainer import train

    out = full_run / "models" / "TSW"
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 4 and summary["zero_stage"] == 2
    assert not (out / "checkpoints").exists()  # removed once the adapter is saved
    metrics = json.loads((full_run / "results" / "train" / "TSW" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and "val_answer_ce/written" in metrics

    # the single-process twin: batch_size × world, same seed, episodes and schedule
    p = load_section(full_run / "params.yaml", "train", TrainParams)
    model, tok = load_backbone(str(full_run / "backbone"))
    eps = load_episodes(p, full_run, tok, "train", None)
    cfg = TrainConfig(**{**p.optim.model_dump(), "batch_size": 2, "checkpoint_every": 0})
    ref = train(model, eps, tok.eos_token_id, p.deltamem_config("TSW"), cfg, tmp_path, progress=False)
    assert summary["episodes_seen"] == ref.summary["episodes_seen"] == 16
    assert summary["tokens"] == ref.summary["tokens"]
    for got, want in zip(summary["history"], ref.history, strict=True):
        for key in ("loss", "answer_ce", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-4), (got["step"], key)
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12)
    a, b = _adapter(out / "adapter"), _adapter(tmp_path / "adapter")
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4, msg=k)

    # rank 0's adapter loads in a single process
    fresh, _ = load_backbone(str(full_run / "backbone"))
    loaded = load_adapter(fresh, out / "adapter")
    loaded_params = dict(loaded.delta_mem.named_parameters())
    assert sorted(loaded_params) == sorted(a)
    for name, param in loaded_params.items():
        assert torch.equal(param.detach(), a[name]), name


@pytest.mark.slow
@needs_deepspeed
def test_killed_run_resumes_to_the_same_adapter(full_run, tmp_path):
    root = tmp_path
    for name in ("backbone", "data", "params.yaml"):
        src = full_run / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name)
    launch(root, "--stop-after", "3")
    ckpt = root / "models" / "TSW" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-000002"]  # the step-3 state died with the "kill"
    shards = sorted(p.name for p in (ckpt / "step-000002" / "deepspeed" / "state").glob("zero_pp_rank_*"))
    assert len(shards) == 2  # one ZeRO optimizer partition per rank
    r = launch(root)
    assert "resumed from" in r.stderr and "at step 2" in r.stderr
    a, b = _adapter(full_run / "models" / "TSW" / "adapter"), _adapter(root / "models" / "TSW" / "adapter")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    full = json.loads((full_run / "models" / "TSW" / "training_summary.json").read_text())["history"]
    resumed = json.loads((root / "models" / "TSW" / "training_summary.json").read_text())["history"]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
