"""MemoryAgentBench data as the official scorer needs it: golds as published, and the recsys movie
mapping ``entity2id.json`` carried from the source to ``<data_dir>/memoryagentbench/``.

Fixtures are written here in the published layouts (invented text and ids):

* the hub dataset ``ai-hyz/MemoryAgentBench``: ``data/<split>-00000-of-00001.parquet`` and
  ``entity2id.json`` at the root;
* the benchmark's code: ``processed_data/Recsys_Redial/entity2id.json``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.data import DataError, load_split, read_split
from pipeline.data.prepare import MANIFEST, prepare
from pipeline.eval.tasks import get_task
from pipeline.params import PrepareParams

# {"<movie name or path>": id}, the shape of the benchmark's file
ENTITY2ID = {"/movies/Heat_(1995)": 101, "Up (2009)": 102, "The-Matrix (1999)": 103, "Alien": 104}
TTL = "Test_Time_Learning"


def _meta(source: str, n: int) -> dict:
    return {
        "source": source,
        "question_ids": [f"{source}-{i}" for i in range(n)],
        "question_types": None,
        "qa_pair_ids": None,
        "question_dates": None,
        "keypoints": None,
        "previous_events": None,
        "demo": None,
        "haystack_sessions": None,
    }


def _recsys_rows(golds: list[list[str]] | None = None) -> list[dict]:
    golds = golds or [["101", " 102"], ["103"]]
    return [
        {
            "context": "User: I loved Heat.\nSystem: Try Up.\nUser: and The Matrix?",
            "questions": [f"Recommend 5 movies for dialogue {i}." for i in range(len(golds))],
            "answers": golds,
            "metadata": _meta("recsys_redial_full", len(golds)),
        }
    ]


def _hub_layout(root: Path, rows: list[dict], *, mapping: dict | None = ENTITY2ID, split: str = TTL) -> Path:
    """A local copy of the hub dataset: ``data/<split>-00000-of-00001.parquet`` + root ``entity2id.json``."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "data" / f"{split}-00000-of-00001.parquet")
    if mapping is not None:
        (root / "entity2id.json").write_text(json.dumps(mapping), encoding="utf-8")
    return root


def _params(**entry) -> PrepareParams:
    return PrepareParams(out_dir="out", datasets=[{"name": "memoryagentbench", "splits": [TTL], **entry}])


# ------------------------------------------------------------------------------------------ the golds
def test_golds_are_kept_as_published_and_niah_scores_as_upstream(tmp_path):
    # RULER NIAH golds with surrounding spaces: upstream tests `gold.lower() in reply.lower()` as given
    rows = [
        {
            "context": "One of the special magic numbers for worried-oval is: 111.\nAnd for zany-photo: 222.",
            "questions": ["  What are the magic numbers?  "],
            "answers": [[" 111", "222 "]],
            "metadata": _meta("ruler_niah_mv_128k", 1),
        }
    ]
    path = tmp_path / "ar.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n", encoding="utf-8")
    (example,), _ = load_split("memoryagentbench", "ar", str(path))
    assert example.answers == [" 111", "222 "]
    assert example.question == "What are the magic numbers?"

    entry = {"name": "memoryagentbench", "source": str(path), "splits": ["ar"]}
    prepare(PrepareParams(out_dir="out", datasets=[entry]), base_dir=tmp_path)
    (stored,) = read_split(tmp_path / "out" / "memoryagentbench" / "ar.jsonl")
    assert stored.answers == [" 111", "222 "]  # the prepared record keeps the spaces too

    task = get_task("memoryagentbench")
    # " 111" occurs (after a space); "222 " does not (followed by "."): 1/2, as upstream's ruler_recall
    assert task.score(stored, "The numbers are 111 and 222.", "official")["score"] == 0.5
    assert task.score(stored, "The numbers are 111 and 222 .", "official")["score"] == 1.0
    # the normalised metrics and the paper's aliases do not see the spaces
    assert task.score(stored, "111", "delta-mem")["accuracy"] == 1.0


# ------------------------------------------------------------------------------------- recsys mapping
@pytest.mark.parametrize("layout", ["hub-root", "hub-data-folder", "hub-file", "upstream-code"])
def test_prepare_copies_the_mapping_from_the_published_layouts(tmp_path, layout):
    rows = _recsys_rows()
    if layout == "upstream-code":  # the benchmark's own code reads processed_data/Recsys_Redial/
        root = _hub_layout(tmp_path / "mab", rows, mapping=None)
        where = root / "processed_data" / "Recsys_Redial" / "entity2id.json"
        where.parent.mkdir(parents=True)
        where.write_text(json.dumps(ENTITY2ID), encoding="utf-8")
        source = "mab"
    else:
        root = _hub_layout(tmp_path / "mab", rows)
        where = root / "entity2id.json"
        source = {
            "hub-root": "mab",
            "hub-data-folder": "mab/data",
            "hub-file": f"mab/data/{TTL}-00000-of-00001.parquet",
        }[layout]
    manifest, out = prepare(_params(source=source), base_dir=tmp_path)

    copied = out / "memoryagentbench" / "entity2id.json"
    assert copied.read_bytes() == where.read_bytes()
    entry = manifest["datasets"]["memoryagentbench"]["files"]["entity2id"]
    assert entry == {
        "path": "memoryagentbench/entity2id.json",
        "sha256": hashlib.sha256(where.read_bytes()).hexdigest(),
        "bytes": where.stat().st_size,
        "origin": where.relative_to(tmp_path).as_posix(),  # relative: no machine prefix in the manifest
    }
    assert json.loads((out / MANIFEST).read_text())["datasets"]["memoryagentbench"]["files"] == {"entity2id": entry}

    # the evaluator finds it where it reads it (the prepared split's folder) and scores ids through it
    examples = read_split(out / "memoryagentbench" / f"{TTL}.jsonl")
    assert [e.answers for e in examples] == [["101", " 102"], ["103"]]
    task = get_task("memoryagentbench")
    task.check_scoring_inputs(examples, "official", out / "memoryagentbench")
    reply = "1. Heat (1995)\n2. Alien\n3. Up"
    assert task.score(examples[0], reply, "official", out / "memoryagentbench")["score"] == 1.0
    assert task.score(examples[1], reply, "official", out / "memoryagentbench")["score"] == 0.0


def test_a_source_without_recsys_ids_needs_no_mapping_and_gets_none(tmp_path):
    rows = _recsys_rows([["Heat"], ["Up"]])  # title golds: no id to map
    rows.append({**_recsys_rows()[0], "metadata": _meta("icl_banking77_5900shot_balance", 2)})
    _hub_layout(tmp_path / "mab", rows, mapping=None)
    manifest, out = prepare(_params(source="mab"), base_dir=tmp_path)
    assert "files" not in manifest["datasets"]["memoryagentbench"]
    assert sorted(p.name for p in (out / "memoryagentbench").iterdir()) == [f"{TTL}.contexts.jsonl", f"{TTL}.jsonl"]

    # when the source holds it, it is carried anyway (e.g. for a later run on the recsys rows)
    (tmp_path / "mab" / "entity2id.json").write_text(json.dumps(ENTITY2ID), encoding="utf-8")
    manifest, out = prepare(_params(source="mab"), base_dir=tmp_path)
    assert (out / "memoryagentbench" / "entity2id.json").is_file()
    assert manifest["datasets"]["memoryagentbench"]["files"]["entity2id"]["origin"] == "mab/entity2id.json"


def test_the_reader_option_names_the_mapping(tmp_path):
    _hub_layout(tmp_path / "mab", _recsys_rows(), mapping=None)
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "movies.json").write_text(json.dumps(ENTITY2ID), encoding="utf-8")
    manifest, out = prepare(_params(source="mab", options={"entity2id": "maps/movies.json"}), base_dir=tmp_path)
    assert manifest["datasets"]["memoryagentbench"]["files"]["entity2id"]["origin"] == "maps/movies.json"
    assert json.loads((out / "memoryagentbench" / "entity2id.json").read_text()) == ENTITY2ID
    with pytest.raises(DataError, match=r"nope\.json: file not found \(reader option 'entity2id'\)"):
        prepare(_params(source="mab", options={"entity2id": "nope.json"}), base_dir=tmp_path)


def _stage(tmp_path: Path, entry: dict, capsys) -> tuple[int, list[str]]:
    from pipeline.stages.prepare import main

    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump({"prepare": {"out_dir": "out", "datasets": [{"name": "memoryagentbench", **entry}]}}),
        encoding="utf-8",
    )
    capsys.readouterr()
    status = main(["--params", str(params), "--no-tracking"])
    return status, capsys.readouterr().err.strip().splitlines()


def test_id_golds_without_a_mapping_stop_the_stage_naming_where_it_looked(tmp_path, capsys):
    root = _hub_layout(tmp_path / "mab", _recsys_rows(), mapping=None)
    status, lines = _stage(tmp_path, {"source": "mab", "splits": [TTL]}, capsys)
    assert status == 2 and len(lines) == 1
    line = lines[0]
    assert line.startswith("prepare: error: mab: recsys golds are movie ids (e.g. 101 of memoryagentbench-")
    for looked in (root / "entity2id.json", root / "processed_data" / "Recsys_Redial" / "entity2id.json"):
        assert str(looked) in line
    assert "reader option 'entity2id'" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("mapping", "expected"),
    [
        ('{"Heat": 101, "Up": "102"}', "expected a JSON object of movie name → integer id"),
        ("[1, 2]", "expected a JSON object of movie name → integer id"),
        ('{"Heat": 101', "not a JSON file"),
        (
            json.dumps({"Heat": 101, "Up": 102}),
            "has no movie id 103 (gold of memoryagentbench-recsys_redial_full-0-q001)",
        ),
    ],
)
def test_an_unusable_mapping_stops_the_stage(tmp_path, capsys, mapping, expected):
    root = _hub_layout(tmp_path / "mab", _recsys_rows(), mapping=None)
    (root / "entity2id.json").write_text(mapping, encoding="utf-8")
    status, lines = _stage(tmp_path, {"source": "mab", "splits": [TTL]}, capsys)
    assert status == 2 and len(lines) == 1
    assert lines[0].startswith(f"prepare: error: {root / 'entity2id.json'}: ") and expected in lines[0]
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ hub source
class _FakeDatasets:
    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def load_dataset(self, hf_id, config=None, split=None, revision=None):
        assert (hf_id, config, split) == ("ai-hyz/MemoryAgentBench", None, TTL)
        return self.rows


def _fake_hub(monkeypatch, tmp_path: Path, rows: list[dict], *, fail: bool = False) -> list[tuple]:
    calls: list[tuple] = []
    cache = tmp_path / "hub-cache" / "entity2id.json"
    cache.parent.mkdir()
    cache.write_text(json.dumps(ENTITY2ID), encoding="utf-8")

    def hf_hub_download(repo_id, filename, *, repo_type=None, revision=None):
        calls.append((repo_id, filename, repo_type, revision))
        if fail:
            raise OSError("offline")
        return str(cache)

    monkeypatch.setitem(sys.modules, "datasets", _FakeDatasets(rows))
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=hf_hub_download))
    return calls


def test_hub_source_downloads_the_mapping_when_recsys_golds_are_ids(tmp_path, monkeypatch):
    calls = _fake_hub(monkeypatch, tmp_path, _recsys_rows())
    manifest, out = prepare(_params(source="hf", revision="abc123"), base_dir=tmp_path)
    assert calls == [("ai-hyz/MemoryAgentBench", "entity2id.json", "dataset", "abc123")]
    assert json.loads((out / "memoryagentbench" / "entity2id.json").read_text()) == ENTITY2ID
    origin = manifest["datasets"]["memoryagentbench"]["files"]["entity2id"]["origin"]
    assert origin == "hf:ai-hyz/MemoryAgentBench/entity2id.json@abc123"


def test_hub_source_without_id_golds_downloads_nothing(tmp_path, monkeypatch):
    calls = _fake_hub(monkeypatch, tmp_path, _recsys_rows([["Heat"], ["Up"]]))
    manifest, _ = prepare(_params(source="hf"), base_dir=tmp_path)
    assert calls == [] and "files" not in manifest["datasets"]["memoryagentbench"]


def test_hub_download_failure_is_one_clear_error(tmp_path, monkeypatch):
    _fake_hub(monkeypatch, tmp_path, _recsys_rows(), fail=True)
    with pytest.raises(DataError) as err:
        prepare(_params(source="hf"), base_dir=tmp_path)
    message = str(err.value)
    assert message.startswith("hf:ai-hyz/MemoryAgentBench/entity2id.json: could not download the recsys movie mapping")
    assert "OSError: offline" in message and "\n" not in message
    assert not (tmp_path / "out").exists()
