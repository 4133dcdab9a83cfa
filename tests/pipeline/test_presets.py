"""The shipped params files (params.yaml and configs/*.yaml) validate and are internally consistent."""

from __future__ import annotations

from pathlib import Path

import pytest

import pipeline.eval.runner
import pipeline.report
import pipeline.train.run  # noqa: F401  (register their params sections)
from pipeline.params import load_section

REPO = Path(__file__).resolve().parents[2]
FILES = [REPO / "params.yaml", *sorted((REPO / "configs").glob("*.yaml"))]
SECTIONS = ["prepare", "backbone", "train", "evaluate", "report"]


def test_presets_exist_for_the_paper_backbones():
    names = {p.name for p in FILES}
    assert {"qwen3-4b-instruct-2507.yaml", "qwen3-8b.yaml", "smollm3-3b.yaml"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_params_file_is_valid_and_consistent(path: Path):
    sections = {s: load_section(path, s) for s in SECTIONS}
    prepare, train, evaluate = sections["prepare"], sections["train"], sections["evaluate"]
    prepared = {d.out_name: set(d.split_names()) for d in prepare.datasets if d.enabled}
    assert train.dataset in prepared, f"train.dataset {train.dataset} is not prepared"
    assert {train.train_split, train.validation_split} <= prepared[train.dataset]
    for variant in train.variants:
        train.deltamem_config(variant)  # every variant builds a valid DeltaMemConfig
    assert set(evaluate.variants) <= set(train.variants)
    for task in evaluate.tasks:
        assert task.dataset in prepared, f"evaluate task {task.dataset} is not prepared"
        assert task.split in prepared[task.dataset], f"{task.dataset}: split {task.split} is not prepared"
    assert sections["backbone"].out_dir == train.backbone == evaluate.backbone
    assert sections["report"].claim in evaluate.conditions


@pytest.mark.parametrize("path", [p for p in FILES if p.parent.name == "configs"], ids=lambda p: p.name)
def test_presets_use_the_papers_recipe(path: Path):
    train = load_section(path, "train")
    cfg = train.deltamem_config("TSW")
    assert cfg.rank == 8 and set(cfg.branches) == {"q", "o"} and cfg.output_init == "base_slice_fixed"
    assert train.write_length == 8192 and train.read_length == 512 and train.dataset == "qasper"
    o = train.optim
    assert (o.lr, o.steps, o.schedule, o.warmup_ratio) == (2e-4, 70, "cosine", 0.1)
    assert train.global_batch() == 32  # the paper's global batch (nproc: auto divides grad_accum among ranks)
    assert load_section(path, "backbone").dtype == "bfloat16"
    assert not load_section(path, "backbone").trust_remote_code
