"""The `prepare` stage end to end: outputs, manifest, MLflow logging, and clean failures."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.pipeline.conftest import REPO_ROOT, shared_file
from tests.pipeline.data.test_readers import HOTPOT

STAGE = ["-m", "pipeline.stages.prepare"]  # run from the params folder: PYTHONPATH names this checkout
SMALL_SYNTHETIC = {"seed": 5, "dialogues": {"train": 20, "validation": 5, "test": 5}}


def _params(tmp_path: Path, datasets: list[dict], **extra) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(
        yaml.safe_dump({"other": {"x": 1}, "prepare": {"out_dir": "out/prepared", "datasets": datasets, **extra}}),
        encoding="utf-8",
    )
    return path


def _run(params: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *STAGE, "--params", str(params), *args],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=params.parent,
    )


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _hotpot_folder(tmp_path: Path, rows: list[dict] | None = None) -> Path:
    folder = tmp_path / "hotpot"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hotpot_dev_distractor_v1.json").write_text(json.dumps(rows or HOTPOT), encoding="utf-8")
    return folder


def test_stage_writes_splits_manifest_and_logs_to_mlflow(tmp_path, mlflow_env):
    _hotpot_folder(tmp_path)
    params = _params(
        tmp_path,
        [
            {"name": "synthetic", "synthetic": SMALL_SYNTHETIC},
            {"name": "hotpotqa", "source": "hotpot"},  # relative to the params file
            {"name": "ifeval", "source": "does/not/exist.jsonl", "enabled": False},
        ],
    )
    result = _run(params)
    assert result.returncode == 0, result.stderr
    assert "prepare: synthetic: train 80, validation 20, test 20" in result.stdout
    out = tmp_path / "out" / "prepared"
    assert sorted(_tree(out)) == [
        "hotpotqa/validation.jsonl",
        "manifest.json",
        "synthetic/test.contexts.jsonl",
        "synthetic/test.jsonl",
        "synthetic/train.contexts.jsonl",
        "synthetic/train.jsonl",
        "synthetic/validation.contexts.jsonl",
        "synthetic/validation.jsonl",
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    train = manifest["datasets"]["synthetic"]["splits"]["train"]
    assert train["examples"] == 80 and train["contexts"] == 20
    assert sum(train["categories"].values()) == 80
    assert set(train["categories"]) <= {"single-hop", "multi-hop", "temporal", "knowledge-update"}
    for entry in train["files"].values():
        assert hashlib.sha256((out / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]
    hotpot = manifest["datasets"]["hotpotqa"]
    assert hotpot["splits"]["validation"]["categories"] == {"bridge": 1, "comparison": 1}
    source_file = tmp_path / "hotpot" / "hotpot_dev_distractor_v1.json"
    assert hotpot["splits"]["validation"]["provenance"]["files"] == [
        {
            "path": "hotpot/hotpot_dev_distractor_v1.json",
            "sha256": hashlib.sha256(source_file.read_bytes()).hexdigest(),
            "bytes": source_file.stat().st_size,
        }
    ]
    assert hotpot["licence"] == "CC BY-SA 4.0"
    assert manifest["totals"]["examples"] == 122
    assert "ifeval" not in manifest["datasets"]

    import mlflow

    runs = mlflow.search_runs(
        experiment_names=["pipeline-tests"], filter_string="tags.stage = 'prepare'", output_format="list"
    )
    assert len(runs) == 1
    run = runs[0]
    assert run.data.metrics["synthetic/train/examples"] == 80
    assert run.data.metrics["hotpotqa/validation/category/bridge"] == 1
    assert run.data.params["prepare.datasets.1.name"] == "hotpotqa"
    logged = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id, artifact_path="manifest.json", dst_path=str(tmp_path / "dl")
            )
        ).read_text()
    )
    assert logged == manifest

    # same params → byte-identical output (in-process this time, no tracking)
    from pipeline.stages.prepare import main

    assert main(["--params", str(params), "--out", str(tmp_path / "again"), "--no-tracking"]) == 0
    assert _tree(tmp_path / "again") == _tree(out)


def test_stage_on_the_real_samples_with_token_lengths(tmp_path, locomo_file, ifeval_file, smol_tokenizer, monkeypatch):
    import pipeline.data.tokenize as tokenize_module

    monkeypatch.setattr(tokenize_module, "load_tokenizer", lambda *a, **k: smol_tokenizer)  # loaded once per session
    params = _params(
        tmp_path,
        [
            {"name": "locomo", "source": str(locomo_file)},
            {"name": "ifeval", "source": str(ifeval_file.parent)},
        ],
        tokenizer={"name_or_path": "embedded", "write_length": 8192, "read_length": 512},
    )
    from pipeline.stages.prepare import main

    assert main(["--params", str(params), "--no-tracking"]) == 0
    manifest = json.loads((tmp_path / "out" / "prepared" / "manifest.json").read_text())
    locomo = manifest["datasets"]["locomo"]["splits"]["test"]
    assert locomo["examples"] == 1986 and locomo["contexts"] == 10
    assert locomo["categories"] == {
        "adversarial": 446,
        "multi-hop": 282,
        "open-domain": 96,
        "single-hop": 841,
        "temporal": 321,
    }
    assert locomo["provenance"]["files"][0]["sha256"] == hashlib.sha256(locomo_file.read_bytes()).hexdigest()
    tokens = locomo["token_lengths"]
    assert 10_000 < tokens["write"]["min"] <= tokens["write"]["p50"] <= tokens["write"]["max"] < 40_000
    assert tokens["write_over_limit"] == 10  # every conversation is longer than 8192 tokens
    assert 20 < tokens["read"]["p50"] < 100 and tokens["read_over_limit"] == 0
    ifeval = manifest["datasets"]["ifeval"]["splits"]["test"]
    assert ifeval["examples"] == 540 and ifeval["contexts"] == 0 and ifeval["token_lengths"]["write"] == {}


def _corruptions(tmp_path: Path):
    """(dataset entries, substrings the single error line must contain) for each kind of bad input."""
    truncated = _hotpot_folder(tmp_path / "t")
    data = truncated / "hotpot_dev_distractor_v1.json"
    data.write_bytes(data.read_bytes()[:300])
    yield [{"name": "hotpotqa", "source": "t/hotpot"}], [str(data), "invalid JSON at line 1 column"]

    rows = json.loads(json.dumps(HOTPOT))
    del rows[1]["question"]
    dropped = _hotpot_folder(tmp_path / "d", rows)
    yield (
        [{"name": "hotpotqa", "source": "d/hotpot"}],
        [
            str(dropped / "hotpot_dev_distractor_v1.json"),
            "record 1 (_id=5a8c7595554299585d9e36b6)",
            "field 'question'",
            "missing required field",
        ],
    )

    yield [{"name": "hotpotqa", "source": "missing.json"}], [str(tmp_path / "missing.json"), "file not found"]
    yield (
        [{"name": "hotpotqa", "source": "x.json"}, {"name": "nonsense", "source": "x"}],
        [
            "unknown dataset 'nonsense'",
            "known datasets: gpqa, hotpotqa, ifeval, locomo, memoryagentbench, qasper",
        ],
    )


@pytest.mark.parametrize("case", range(4))
def test_bad_input_fails_with_one_clear_error_and_no_output(tmp_path, case):
    datasets, expected = list(_corruptions(tmp_path))[case]
    # a good data set first: its output must not survive the failure either
    params = _params(tmp_path, [{"name": "synthetic", "synthetic": SMALL_SYNTHETIC}, *datasets])
    result = _run(params, "--no-tracking")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prepare: error: "), result.stderr
    for part in expected:
        assert part in lines[0]
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_corrupt_locomo_fails_cleanly(tmp_path, locomo_file):
    data = json.loads(locomo_file.read_text(encoding="utf-8"))
    del data[0]["qa"][7]["category"]
    bad = tmp_path / "locomo10.json"
    bad.write_text(json.dumps(data), encoding="utf-8")
    result = _run(_params(tmp_path, [{"name": "locomo", "source": "locomo10.json"}]), "--no-tracking")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"prepare: error: {bad}: record 0 (sample_id=conv-26): field 'qa[7].category': missing required field"
    )
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_failure_keeps_the_previous_output(tmp_path):
    from pipeline.stages.prepare import main

    _hotpot_folder(tmp_path)
    params = _params(tmp_path, [{"name": "hotpotqa", "source": "hotpot"}])
    assert main(["--params", str(params), "--no-tracking"]) == 0
    before = _tree(tmp_path / "out" / "prepared")
    (tmp_path / "hotpot" / "hotpot_dev_distractor_v1.json").write_text("[{", encoding="utf-8")
    assert main(["--params", str(params), "--no-tracking"]) == 2
    assert _tree(tmp_path / "out" / "prepared") == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["prepared"]  # no temporary folders left


def test_single_file_for_several_splits_is_refused(tmp_path, capsys):
    from pipeline.stages.prepare import main

    shared_file("ifeval/input_data.jsonl")
    params = _params(
        tmp_path,
        [{"name": "ifeval", "source": str(shared_file("ifeval/input_data.jsonl")), "splits": ["train", "test"]}],
    )
    assert main(["--params", str(params), "--no-tracking"]) == 2
    assert "the source is a single file but 2 splits are listed" in capsys.readouterr().err


def test_bad_params_exit_code(tmp_path, capsys):
    from pipeline.stages.prepare import main

    params = _params(tmp_path, [{"name": "locomo"}])
    assert main(["--params", str(params), "--no-tracking"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prepare: error: {params}: section 'prepare': datasets.0: dataset 'locomo' needs a source")
