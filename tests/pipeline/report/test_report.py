"""The report stage: statistics on hand-checked cases, and a report built from a results tree."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.report import (
    ReportInputError,
    ReportParams,
    mean_interval,
    paired_comparison,
    run_report,
    sign_flip_p_value,
)
from pipeline.stats import ratio


# ------------------------------------------------------------------------------------------- statistics
def test_sign_flip_p_value_exact_enumeration():
    # d = (1, 1, 1): of the 8 sign patterns, only all-plus and all-minus reach |mean| = 1 → p = 2/8
    assert sign_flip_p_value([1.0, 1.0, 1.0]) == pytest.approx(0.25)
    # d = (2, 1): |mean| ≥ 1.5 for (+,+) and (−,−) → p = 2/4
    assert sign_flip_p_value([2.0, 1.0]) == pytest.approx(0.5)
    assert sign_flip_p_value([0.0, 0.0, 0.0]) == 1.0


def test_sign_flip_p_value_sampled_is_small_for_a_clear_effect_and_large_for_noise():
    rng = np.random.default_rng(1)
    assert sign_flip_p_value(np.ones(40), permutations=2000) < 0.001
    assert sign_flip_p_value(rng.normal(size=40) * 1.0, permutations=2000) > 0.01


def test_mean_interval_contains_the_mean_and_shrinks_with_n():
    small = mean_interval([0, 1] * 10, resamples=2000, seed=0)
    large = mean_interval([0, 1] * 200, resamples=2000, seed=0)
    assert small.value == pytest.approx(0.5) and small.low < 0.5 < small.high
    assert (large.high - large.low) < (small.high - small.low) / 2
    constant = mean_interval([0.25] * 7)
    assert (constant.low, constant.high) == (0.25, 0.25)


def test_ratio_conventions_for_a_zero_baseline():
    assert ratio(0.4, 0.2) == pytest.approx(2.0)
    assert ratio(0.3, 0.0) == math.inf
    assert math.isnan(ratio(0.0, 0.0))  # undefined: reported as n/a, never 1.00×


def test_paired_comparison_when_the_baseline_scores_nothing():
    x = [1.0] * 10 + [0.0] * 30
    y = [0.0] * 40
    c = paired_comparison(x, y, resamples=2000, permutations=2000, seed=0)
    assert c.n == 40 and c.mean_x == pytest.approx(0.25) and c.mean_y == 0.0
    assert c.ratio.value == math.inf and c.ratio.excludes(1.0)
    assert c.difference.low > 0 and c.difference.value == pytest.approx(0.25)
    assert c.p_value < 0.01


def test_paired_comparison_of_identical_scores_is_null():
    x = [1.0, 0.0, 1.0, 0.5] * 10
    c = paired_comparison(x, x, resamples=500, permutations=500)
    assert c.difference.value == 0 and c.difference.low == 0 and c.difference.high == 0
    assert c.ratio.value == pytest.approx(1.0) and not c.ratio.excludes(1.0)
    assert c.p_value == 1.0


def test_pairing_matters():
    # Same marginal means, but x beats y on every question by 0.1: the paired test sees it.
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 0.9, size=60)
    c = paired_comparison(y + 0.1, y, resamples=1000, permutations=2000)
    assert c.difference.low == pytest.approx(0.1) and c.p_value < 0.001


def test_bad_scores_are_rejected():
    with pytest.raises(ValueError, match="same length"):
        paired_comparison([1.0, 0.0], [1.0])
    with pytest.raises(ValueError, match="non-empty"):
        mean_interval([])
    with pytest.raises(ValueError, match="finite"):
        mean_interval([1.0, float("nan")])


# ------------------------------------------------------------------------------------------- results tree
N = 40


def _unit(root: Path, variant: str, condition: str, scores: list[float], cats: list[str]) -> dict:
    folder = root / "results" / "eval" / variant / condition / "synthetic"
    folder.mkdir(parents=True)
    rows = [
        {"example_id": f"q{i}", "task": "synthetic", "category": cats[i], "scores": {"em": s, "f1": s}}
        for i, s in enumerate(scores)
    ]
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = {
        "em": sum(scores) / len(scores),
        "headline": sum(scores) / len(scores),
        "cost/questions": float(len(scores)),
        "cost/forward_tokens": 1000.0,
        "cost/forward_tokens_per_question": 25.0,
        "cost/wall_s": 3.0,
        "cost/peak_memory_bytes": 2.0**30,
        "cost/state_bytes": 7680.0,
        "cost/kv_bytes_history": 4.0 * 2**20,
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return metrics


@pytest.fixture
def results_tree(tmp_path: Path) -> Path:
    cats = ["single-hop", "temporal"] * (N // 2)
    recall = [1.0 if i % 2 == 0 else 0.0 for i in range(N)]  # δ-mem answers 20 of 40
    index = {
        "base/base_no_context": {"synthetic": _unit(tmp_path, "base", "base_no_context", [0.0] * N, cats)},
        "base/rag_bm25": {
            "synthetic": _unit(tmp_path, "base", "rag_bm25", [1.0 if i < 4 else 0.0 for i in range(N)], cats)
        },
        "TSW/deltamem_only": {"synthetic": _unit(tmp_path, "TSW", "deltamem_only", recall, cats)},
        "TSW/deltamem_shuffled": {"synthetic": _unit(tmp_path, "TSW", "deltamem_shuffled", recall, cats)},
    }
    (tmp_path / "results" / "eval" / "metrics.json").write_text(json.dumps(index))
    train = tmp_path / "results" / "train" / "TSW"
    train.mkdir(parents=True)
    (train / "metrics.json").write_text(
        json.dumps(
            {
                "steps": 3,
                "final_loss": 1.0,
                "val_answer_ce/written": 1.1,
                "val_answer_ce/shuffled": 1.2,
                "val_answer_ce/none": 5.0,
            }
        )
    )
    model = tmp_path / "models" / "TSW"
    model.mkdir(parents=True)
    history = [{"step": s, "loss": 3.0 / s, "answer_ce": 3.0 / s, "lr": 1e-3} for s in (1, 2, 3)]
    (model / "training_summary.json").write_text(json.dumps({"history": history}))
    return tmp_path


def test_report_from_a_results_tree(results_tree: Path):
    p = ReportParams(bootstrap=500, permutations=1000)
    result = run_report(p, results_tree)
    out = results_tree / "reports"
    for name in (
        "report.md",
        "report.html",
        "summary.json",
        "plots/headline.png",
        "plots/training.png",
        "plots/memory.png",
        "plots/headline.csv",
        "plots/training/TSW.csv",
    ):
        assert (out / name).is_file(), name
    claims = {c["versus"]: c for c in result.claims}
    # δ-mem answers 20/40, the backbone 0/40: the claim holds, with an infinite ratio
    assert claims["base_no_context"]["holds"] and claims["base_no_context"]["ratio"].value == math.inf
    # ... but the shuffled-state control scores the same: no evidence of recall
    assert not claims["TSW/deltamem_shuffled"]["holds"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["claim/TSW/deltamem_only/synthetic/gt/base_no_context"] == 1
    assert summary["claim/TSW/deltamem_only/synthetic/gt/TSW/deltamem_shuffled"] == 0
    assert summary["TSW/deltamem_only/synthetic/vs/rag_bm25/ratio"] == pytest.approx(5.0)
    assert summary["TSW/deltamem_only/synthetic/score"] == pytest.approx(0.5)
    md = (out / "report.md").read_text()
    assert "Claims checked" in md and "per category" in md and "![Headline" in md
    assert "| `TSW/deltamem_only` | synthetic | ∞" in md  # ratio vs the backbone
    assert "`rag_bm25` | 5.00×" in md  # the best baseline and the ratio to it
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and 'src="plots/' not in html  # self-contained
    curve = (out / "plots" / "training" / "TSW.csv").read_text().splitlines()
    assert curve[0].split(",")[:2] == ["step", "loss"] and len(curve) == 4


def test_report_replaces_the_old_folder_atomically(results_tree: Path):
    stale = results_tree / "reports" / "stale.txt"
    stale.parent.mkdir()
    stale.write_text("old")
    run_report(ReportParams(bootstrap=200, permutations=200), results_tree)
    assert not stale.exists() and (results_tree / "reports" / "report.md").is_file()
    assert not [p for p in results_tree.iterdir() if p.name.startswith(".reports")]


def test_missing_or_bad_inputs_name_the_file(results_tree: Path, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(ReportInputError, match=r"results/eval/metrics.json: not found"):
        run_report(ReportParams(), empty)
    bad = results_tree / "results" / "eval" / "TSW" / "deltamem_only" / "synthetic" / "predictions.jsonl"
    bad.write_text('{"example_id": "q0", "task": "synthetic", "scores": {"em": 1}}\n{oops\n')
    with pytest.raises(ReportInputError, match=r"predictions.jsonl:2: invalid JSON"):
        run_report(ReportParams(), results_tree)
    assert not (results_tree / "reports").exists()  # nothing half-written


def test_report_stage_cli_without_tracking(results_tree: Path, capsys):
    from pipeline.stages.report import main

    params = results_tree / "params.yaml"
    params.write_text("report: {bootstrap: 200, permutations: 200}\n")
    assert main(["--params", str(params), "--no-tracking"]) == 0
    out = capsys.readouterr().out
    assert "deltamem_only > base_no_context holds" in out
    assert "deltamem_only > TSW/deltamem_shuffled does NOT hold" in out
    params.write_text("report: {bootstrap: 5}\n")
    assert main(["--params", str(params), "--no-tracking"]) == 2
    assert "bootstrap" in capsys.readouterr().err


def test_results_excerpt_and_readme_splice(results_tree: Path, tmp_path: Path):
    from pipeline.report.readme import END, START, main, splice

    run_report(ReportParams(bootstrap=200, permutations=200), results_tree)
    results = (results_tree / "reports" / "results.md").read_text()
    assert "### Claims checked" in results and "### Headline scores" in results and "### Training" in results
    assert "![" not in results and "### Cost" not in results
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{START}\nold table\n{END}\nafter\n")
    assert main(["--results", str(results_tree / "reports" / "results.md"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{END}\nafter\n") and "old table" not in text
    assert "### Claims checked" in text and "# δ-mem report" not in text
    assert splice(text, results) == splice(splice(text, results), results)  # idempotent
    with pytest.raises(ValueError, match="must contain"):
        splice("no markers", results)
