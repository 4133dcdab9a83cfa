"""The shipped params files (params.yaml and configs/*.yaml) validate and are internally consistent."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.params import PipelineParams, load_pipeline, load_section

REPO = Path(__file__).resolve().parents[2]
FILES = [REPO / "params.yaml", *sorted((REPO / "configs").glob("*.yaml"))]
SECTIONS = ["prepare", "backbone", "train", "evaluate", "report"]


def test_presets_exist_for_the_paper_backbones():
    names = {p.name for p in FILES}
    assert {"qwen3-4b-instruct-2507.yaml", "qwen3-8b.yaml", "smollm3-3b.yaml"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_params_file_is_valid_and_consistent(path: Path):
    """The whole file validates, cross-section rules included (PipelineParams: the training set and every
    evaluation set are prepared, every variant builds a DeltaMemConfig and is trained, one backbone)."""
    params = load_pipeline(path)
    assert isinstance(params, PipelineParams)
    sections = {s: getattr(params, s) for s in SECTIONS}
    assert all(v is not None for v in sections.values()), sections
    assert sections == {s: load_section(path, s) for s in SECTIONS}
    train, evaluate = sections["train"], sections["evaluate"]
    assert train.data_dir == evaluate.data_dir == sections["prepare"].out_dir  # so the rules above applied
    # what a shipped file does beyond the schema's rules: the backbone stage's folder is what both read,
    # and the report's claim condition is evaluated
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
