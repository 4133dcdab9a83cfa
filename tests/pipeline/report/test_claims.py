"""Report claims that test δ-mem (every variant, captions), per-variant state sizes, and n/a for 0/0 ratios."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from pipeline.params import ParamsError, load_section
from pipeline.report import ReportParams, paired_comparison, run_report
from pipeline.report.build import NA, ClaimSpec, caption, mlflow_payload

REPO = Path(__file__).resolve().parents[3]
PAPER_CLAIMS = [
    {"name": "paper ratio", "deltamem": "deltamem_full_context", "versus": "base_full_context"},
    {"name": "recall", "deltamem": "deltamem_only", "versus": "deltamem_shuffled"},
]
N = 24


def _unit(
    root: Path, index: dict, variant: str, condition: str, scores: list[float], task: str = "synthetic", state=7680.0
):
    folder = root / "results" / "eval" / variant / condition / task
    folder.mkdir(parents=True)
    rows = [{"example_id": f"q{i}", "task": "synthetic", "scores": {"em": s, "f1": s}} for i, s in enumerate(scores)]
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = {"em": sum(scores) / len(scores), "headline": sum(scores) / len(scores), "cost/kv_bytes_history": 2.0**22}
    if condition.startswith("deltamem"):
        metrics["cost/state_bytes"] = state
    (folder / "metrics.json").write_text(json.dumps(metrics))
    index.setdefault(f"{variant}/{condition}", {})[task] = metrics


def _write_index(root: Path, index: dict) -> None:
    (root / "results" / "eval" / "metrics.json").write_text(json.dumps(index))


@pytest.fixture
def three_variants(tmp_path: Path) -> Path:
    """TSW recalls (beats its shuffled control) and adds to the full context; SSW only formats (its
    shuffled control scores the same); MSW has no shuffled control evaluated."""
    idx: dict = {}
    half = [1.0 if i % 2 == 0 else 0.0 for i in range(N)]
    third = [1.0 if i % 3 == 0 else 0.0 for i in range(N)]
    _unit(tmp_path, idx, "base", "base_no_context", [0.0] * N)
    _unit(tmp_path, idx, "base", "base_full_context", third)
    _unit(tmp_path, idx, "TSW", "deltamem_full_context", [1.0] * N, state=7680.0)
    _unit(tmp_path, idx, "TSW", "deltamem_only", half, state=7680.0)
    _unit(tmp_path, idx, "TSW", "deltamem_shuffled", [0.0] * N, state=7680.0)
    _unit(tmp_path, idx, "SSW", "deltamem_full_context", third, state=7680.0)
    _unit(tmp_path, idx, "SSW", "deltamem_only", half, state=7680.0)
    _unit(tmp_path, idx, "SSW", "deltamem_shuffled", half, state=7680.0)
    _unit(tmp_path, idx, "MSW", "deltamem_full_context", [1.0] * N, state=4 * 7680.0)
    _unit(tmp_path, idx, "MSW", "deltamem_only", half, state=4 * 7680.0)
    _write_index(tmp_path, idx)
    return tmp_path


def _by(claims: list[dict]) -> dict[tuple[str, str], dict]:
    return {(c["claim"], c["variant"]): c for c in claims}


def test_paper_ratio_and_recall_are_checked_for_every_variant(three_variants: Path):
    p = ReportParams(claims=PAPER_CLAIMS, bootstrap=300, permutations=300)
    result = run_report(p, three_variants)
    got = _by(result.claims)
    assert set(got) == {(c, v) for c in ("paper ratio", "recall") for v in ("TSW", "SSW", "MSW")} - {("recall", "MSW")}
    assert got[("paper ratio", "TSW")]["holds"] and got[("paper ratio", "TSW")]["ratio"].value == pytest.approx(3.0)
    assert got[("paper ratio", "TSW")]["versus"] == "base_full_context"
    assert not got[("paper ratio", "SSW")]["holds"]  # SSW full context = the backbone's
    assert got[("paper ratio", "MSW")]["holds"]
    assert got[("recall", "TSW")]["holds"] and got[("recall", "TSW")]["versus"] == "TSW/deltamem_shuffled"
    assert not got[("recall", "SSW")]["holds"]  # formats, does not recall
    missing = _by(result.not_evaluated)
    assert set(missing) == {("recall", "MSW")} and missing[("recall", "MSW")]["versus"] == "MSW/deltamem_shuffled"
    s = result.summary
    assert s["claim/SSW/deltamem_only/synthetic/gt/SSW/deltamem_shuffled"] == 0
    assert s["claim/MSW/deltamem_full_context/synthetic/gt/base_full_context"] == 1
    md = (three_variants / "reports" / "report.md").read_text()
    assert (
        "| recall | synthetic | `MSW/deltamem_only` > `MSW/deltamem_shuffled` | – | – | – | – | not evaluated |" in md
    )
    # the caption says what each comparison separates
    assert "**paper ratio** (`deltamem_full_context` vs `base_full_context`): the same prompt holding the history" in md
    assert (
        "**recall** (`deltamem_only` vs `deltamem_shuffled`): the same adapter and the same question-only prompt" in md
    )
    assert "recall from the memory" in (three_variants / "reports" / "report.html").read_text()


def test_default_claims_follow_claim_reference_and_controls():
    specs = ReportParams(claim="deltamem_only").claim_specs()
    assert [(s.deltamem, s.versus) for s in specs] == [
        ("deltamem_only", "base_no_context"),
        ("deltamem_only", "deltamem_shuffled"),
    ]
    assert "not separated" in caption(specs[0]) and "recall from the memory" in caption(specs[1])
    own = ClaimSpec(deltamem="deltamem_only", versus="rag_bm25", separates="my words")
    assert caption(own) == "my words" and own.title == "deltamem_only > rag_bm25"


def test_a_claim_limited_to_tasks_reports_a_listed_task_it_cannot_check(three_variants: Path):
    spec = {"name": "no history", "deltamem": "deltamem_full_context", "versus": "base_no_context", "tasks": ["ifeval"]}
    result = run_report(ReportParams(claims=[spec], bootstrap=200, permutations=200), three_variants)
    assert not result.claims and {c["task"] for c in result.not_evaluated} == {"ifeval"}
    assert len(result.not_evaluated) == 3  # one per variant


@pytest.mark.parametrize(
    ("claims", "match"),
    [
        ([{"deltamem": "deltamem_only", "versus": "nope"}], "unknown condition 'nope'"),
        ([{"deltamem": "base_full_context", "versus": "base_no_context"}], "not a δ-mem condition"),
        ([{"deltamem": "deltamem_only", "versus": "base_no_context", "typo": 1}], "typo"),
    ],
)
def test_bad_claims_are_params_errors(tmp_path: Path, claims, match):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"report": {"claims": claims}}))
    with pytest.raises(ParamsError, match=match) as err:
        load_section(params, "report", ReportParams)
    assert "section 'report'" in str(err.value)


@pytest.mark.parametrize("preset", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_presets_check_the_papers_ratio_and_recall_on_what_they_evaluate(preset: Path):
    data = yaml.safe_load(preset.read_text())
    p = ReportParams.model_validate(data["report"])
    pairs = {(s.deltamem, s.versus) for s in p.claim_specs()}
    assert ("deltamem_full_context", "base_full_context") in pairs
    assert ("deltamem_only", "deltamem_shuffled") in pairs
    ev = data["evaluate"]
    for spec in p.claim_specs():
        tasks = [t for t in ev["tasks"] if spec.tasks is None or (t.get("name") or t["dataset"]) in spec.tasks]
        assert tasks, spec
        for t in tasks:
            conds = t.get("conditions") or ev["conditions"]
            if spec.tasks is not None:  # a claim limited to tasks must be checkable on each of them
                assert spec.deltamem in conds and spec.versus in conds, (spec, t)
    assert ev["variants"] == "all" and set(data["train"]["variants"]) >= {"TSW", "SSW", "MSW"}


# ------------------------------------------------------------------------------------------- state sizes
def test_memory_plot_has_each_variants_state_size(three_variants: Path):
    run_report(ReportParams(claims=PAPER_CLAIMS, bootstrap=200, permutations=200), three_variants)
    with (three_variants / "reports" / "plots" / "memory.csv").open() as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"TSW", "SSW", "MSW"}
    assert float(rows["MSW"]["state_bytes"]) == 4 * float(rows["TSW"]["state_bytes"]) == 4 * 7680.0
    assert float(rows["TSW"]["kv_bytes_history"]) == 2.0**22
    assert (three_variants / "reports" / "plots" / "memory.png").stat().st_size > 1000


# ------------------------------------------------------------------------------------------- 0/0 ratios
def test_zero_over_zero_is_undefined_not_one():
    c = paired_comparison([0.0] * 10, [0.0] * 10, resamples=200, permutations=200)
    assert math.isnan(c.ratio.value) and math.isnan(c.ratio.low) and not c.ratio.excludes(1.0)
    c = paired_comparison([1.0] + [0.0] * 9, [0.0] * 10, resamples=200, permutations=200)
    assert c.ratio.value == math.inf  # only the baseline scores nothing: ∞, not n/a


@pytest.fixture
def both_zero(tmp_path: Path) -> Path:
    idx: dict = {}
    _unit(tmp_path, idx, "base", "base_no_context", [0.0] * N)
    _unit(tmp_path, idx, "TSW", "deltamem_only", [0.0] * N)
    _unit(tmp_path, idx, "TSW", "deltamem_shuffled", [0.0] * N)
    _write_index(tmp_path, idx)
    (tmp_path / "params.yaml").write_text("report: {bootstrap: 200, permutations: 200}\n")
    return tmp_path


def test_undefined_ratios_are_na_in_markdown_html_and_json(both_zero: Path):
    result = run_report(ReportParams(bootstrap=200, permutations=200), both_zero)
    out = both_zero / "reports"
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    for text in (md, html):
        assert "1.00×" not in text and "n/a" in text
    assert "| `TSW/deltamem_only` | synthetic | n/a |" in md
    summary = json.loads((out / "summary.json").read_text())
    assert summary["TSW/deltamem_only/synthetic/vs/base_no_context/ratio"] == NA
    assert summary["TSW/deltamem_only/mean_ratio_vs_base_no_context"] == NA
    assert all(not c["holds"] for c in result.claims)
    metrics, tags = mlflow_payload(summary)
    assert "TSW/deltamem_only/synthetic/vs/base_no_context/ratio" not in metrics
    assert tags["TSW/deltamem_only/synthetic/vs/base_no_context/ratio"] == NA
    assert metrics["TSW/deltamem_only/synthetic/vs/base_no_context/diff"] == 0.0


def test_undefined_ratios_are_na_in_mlflow(both_zero: Path, mlflow_env, capsys):
    import mlflow

    from pipeline import tracking
    from pipeline.stages.report import main

    assert main(["--params", str(both_zero / "params.yaml")]) == 0
    assert "ratio n/a" in capsys.readouterr().out
    client = mlflow.tracking.MlflowClient(tracking.tracking_uri())
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        "tags.stage = 'report'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    run = runs[0]
    key = tracking.metric_key("TSW/deltamem_only/synthetic/vs/base_no_context/ratio")
    assert run.data.tags[key] == NA and key not in run.data.metrics
    assert run.data.metrics[tracking.metric_key("TSW/deltamem_only/synthetic/vs/base_no_context/diff")] == 0.0
