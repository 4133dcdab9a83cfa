"""The one params schema (pipeline/params.py): PipelineParams, its cross-section rules, its choices."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import get_args

import pytest
import yaml

from pipeline import params as schema
from pipeline.params import ParamsError, PipelineParams, load_pipeline, load_section

REPO = Path(__file__).resolve().parents[2]
SHIPPED = yaml.safe_load((REPO / "params.yaml").read_text())


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _shipped(**changes) -> dict:
    """The shipped params with ``changes`` (``"train.dataset": value``; None deletes the key)."""
    data = copy.deepcopy(SHIPPED)
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        node = data
        for p in parents:
            node = node[p]
        if value is None:
            del node[key]
        else:
            node[key] = value
    return data


def test_every_section_of_the_file_is_a_sub_model():
    assert set(schema.SECTIONS) == {"prepare", "backbone", "train", "evaluate", "report"}
    assert schema.SECTIONS["evaluate"] is schema.EvalParams and schema.SECTIONS["train"] is schema.TrainParams
    for name, model in schema.SECTIONS.items():
        assert PipelineParams.model_fields[name].annotation == model | None


def test_the_section_models_are_the_ones_the_stages_import():
    """One definition: the modules of the stages re-use the schema's classes, they define none."""
    import pipeline.backbone
    import pipeline.eval.params
    import pipeline.eval.runner
    import pipeline.report
    import pipeline.report.build
    import pipeline.train.run
    import pipeline.train.trainer

    assert pipeline.backbone.BackboneParams is schema.BackboneParams
    assert pipeline.train.run.TrainParams is schema.TrainParams
    assert pipeline.train.run.OptimParams is schema.OptimParams
    assert pipeline.eval.params.EvalParams is pipeline.eval.runner.EvalParams is schema.EvalParams
    assert pipeline.eval.runner.RayParams is schema.RayParams and pipeline.eval.runner.TaskEntry is schema.TaskEntry
    assert pipeline.report.ReportParams is schema.ReportParams and pipeline.report.build.ClaimSpec is schema.ClaimSpec


def test_the_trainer_config_derives_from_the_optimiser_section():
    """The optimiser fields are defined once (OptimParams); TrainConfig only adds the logging interval."""
    from pipeline.train.trainer import TrainConfig

    assert issubclass(TrainConfig, schema.OptimParams)
    assert set(TrainConfig.model_fields) - set(schema.OptimParams.model_fields) == {"log_every"}
    optim = load_section(REPO / "params.yaml", "train").optim
    cfg = TrainConfig(**optim.model_dump())
    assert cfg.model_dump(exclude={"log_every"}) == optim.model_dump() and cfg.log_every == 1
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="step")


def test_the_choices_are_the_registries_names():
    """The Literal choices here are the names the code implements (conditions, decoding, scoring)."""
    from pipeline.eval.conditions import CONDITIONS
    from pipeline.eval.tasks import DECODING_MODES, SCORINGS

    assert tuple(CONDITIONS) == schema.CONDITION_NAMES == get_args(schema.ConditionName)
    assert {n for n, c in CONDITIONS.items() if c.uses_adapter} == set(schema.DELTAMEM_CONDITIONS)
    assert get_args(schema.DecodingMode) == DECODING_MODES and get_args(schema.ScoringName) == SCORINGS


def test_a_section_without_a_model_is_refused_as_the_model(tmp_path):
    path = _write(tmp_path, _shipped())
    assert load_section(path, "report", schema.ReportParams) == load_section(path, "report")
    with pytest.raises(TypeError, match="validated by"):
        load_section(path, "report", schema.EvalParams)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"train.dataset": "qasper"}, "train.dataset: 'qasper' is not prepared (prepare.datasets writes: synthetic)"),
        ({"train.validation_split": "dev"}, "train: split(s) ['dev'] of 'synthetic' are not prepared"),
        (
            {"evaluate.tasks": [{"dataset": "synthetic", "split": "dev"}]},
            "evaluate.tasks.0: synthetic/dev is not prepared (prepare writes: synthetic/train",
        ),
        ({"evaluate.tasks": [{"dataset": "locomo", "split": "test"}]}, "evaluate.tasks.0: locomo/test is not prepared"),
        ({"evaluate.variants": ["SSW"]}, "evaluate.variants: ['SSW'] are not keys of train.variants (TSW)"),
        ({"evaluate.backbone": "embedded"}, "evaluate.backbone 'embedded' is not train.backbone 'models/backbone'"),
        ({"train.variants": {}, "evaluate.variants": "all"}, "evaluate.variants is 'all' but train.variants lists"),
        ({"train.variants": {"TSW": {"write_mode": "XSW"}}}, "section 'train': variants.TSW: "),
        ({"train.variants": {"base": {"write_mode": "TSW"}}}, "section 'train': variants: 'base' is reserved"),
        ({"report.claim": "deltamem_onyl"}, "section 'report': claim: unknown condition 'deltamem_onyl'"),
        (
            {"train.optim": {"schedule": "step"}},
            "section 'train': optim.schedule: schedule 'step'; allowed: cosine, linear, constant",
        ),
    ],
)
def test_cross_section_and_choice_errors_name_the_file_and_keys(tmp_path, changes, message):
    path = _write(tmp_path, _shipped(**changes))
    with pytest.raises(ParamsError) as err:
        load_pipeline(path)
    assert str(err.value).startswith(f"{path}: "), err.value
    assert message in str(err.value), err.value
    with pytest.raises(ParamsError) as again:
        load_section(path, "prepare")  # every stage validates the whole file before its work
    assert str(again.value) == str(err.value)


@pytest.mark.parametrize(
    "changes",
    [
        {"evaluate.variants": ["SSW"], "evaluate.adapters": {"SSW": "elsewhere/adapter"}},  # an adapter folder
        {"evaluate.data_dir": "other/prepared", "evaluate.tasks": [{"dataset": "locomo", "split": "test"}]},
        {"train.data_dir": "other/prepared", "train.dataset": "qasper"},  # data prepared elsewhere
        {"train.limit_validation": 0, "train.validation_split": "dev"},  # no validation: its split is not read
    ],
)
def test_the_rules_apply_only_to_what_the_sections_relate(tmp_path, changes):
    load_pipeline(_write(tmp_path, _shipped(**changes)))


def test_a_rule_needs_both_of_its_sections(tmp_path):
    data = _shipped(**{"train.dataset": "qasper", "evaluate.variants": ["SSW"]})
    del data["prepare"], data["evaluate"]
    assert load_section(_write(tmp_path, data), "train").dataset == "qasper"


def test_evaluate_all_variants_are_the_trained_ones(tmp_path):
    data = _shipped(**{"evaluate.variants": "all"})
    data["train"]["variants"] = {"TSW": {"write_mode": "TSW"}, "MSW": {"write_mode": "MSW"}}
    assert load_section(_write(tmp_path, data), "evaluate").variants == ["TSW", "MSW"]
