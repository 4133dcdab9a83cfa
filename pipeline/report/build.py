"""The ``report`` stage: evaluation + training results → ``reports/`` (Markdown, HTML, PNG, summary).

What it computes (per task, over the *same questions* for every pair of conditions):

* headline score of every condition with a 95% percentile-bootstrap interval;
* for every δ-mem condition: the ratio x̄/ȳ to the frozen backbone (``reference``, default
  ``base_no_context``) and to the best non-δ-mem baseline on that task — the way the paper reports
  δ-mem ("1.10× the backbone") — with paired-bootstrap intervals, and the mean over tasks of the ratios;
* a paired comparison (difference, ratio, sign-flip permutation p-value) of every δ-mem condition against
  every baseline and control (``deltamem_shuffled``: the same adapter reading *another* conversation's
  state — the check that δ-mem recalls rather than only formats);
* the claims (``report.claims``, :class:`ClaimSpec`), each checked for every δ-mem variant: e.g. the
  paper's ratio (``deltamem_full_context`` ÷ ``base_full_context``: the same prompt with and without
  δ-mem) and recall (``deltamem_only`` vs ``deltamem_shuffled``); the caption says what each comparison
  separates (:data:`SEPARATES`), and a claim whose conditions were not evaluated is listed as such;
* ratios that are undefined (0/0: both conditions score nothing) are "n/a" everywhere (Markdown, HTML,
  ``summary.json``, MLflow tags), never 1.00×;
* per-category tables (LoCoMo's adversarial category is shown but is not in its headline);
* training curves and held-out answer loss with the written / shuffled / no state;
* a cost table: backbone tokens, wall time, peak memory, δ-mem state bytes (per variant) vs KV-cache bytes.

Outputs (written to a temporary folder, then renamed into place): ``report.md``, ``report.html``
(self-contained), ``results.md`` (the claims, headline and training tables, for the README), ``summary.json`` (flat numbers for ``dvc metrics``), ``plots/*.png`` and the
``dvc plots`` data ``plots/headline.csv``, ``plots/memory.csv`` (δ-mem state bytes per task and variant beside
the history's KV cache) and ``plots/training/<variant>.csv``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.common import atomic_dir
from pipeline.params import ClaimSpec, ReportParams
from pipeline.stats import Interval, PairedComparison, mean_interval, paired_comparison

from .collect import BASE_VARIANT, UnitResult, collect_eval, collect_train
from .document import Document, Heading, Image, Paragraph, Table

# What a paired comparison of two conditions separates (same questions; they differ only as said here).
SEPARATES: dict[tuple[str, str], str] = {
    ("deltamem_full_context", "base_full_context"): "the same prompt holding the history, with and without "
    "δ-mem (adapter + state written online while it reads): what δ-mem adds to a backbone that already reads "
    "the history (the paper's ratio)",
    ("deltamem_only", "deltamem_shuffled"): "the same adapter and the same question-only prompt, reading the "
    "conversation's own state vs another conversation's: recall from the memory, separated from what the "
    "adapter does whatever the state holds (answer format, priors)",
    ("deltamem_only", "base_no_context"): "the same question-only prompt, adapter + the conversation's state vs "
    "the frozen backbone: what adapter and memory add together (recall and answer format not separated: see "
    "the shuffled control)",
    ("deltamem_full_context", "base_no_context"): "history in the prompt + δ-mem vs the question alone: favours "
    "any prompt that holds the history, so it does not separate δ-mem from reading the history (on tasks "
    "without a history, e.g. IFEval and GPQA, both prompts are the question and it is the paper's ratio)",
    ("deltamem_only", "base_full_context"): "the conversation's state instead of the history in the prompt: "
    "how much of the history the fixed-size state carries",
    ("deltamem_only", "rag_bm25"): "the conversation's state vs BM25-retrieved history segments in the prompt",
    ("deltamem_full_context", "deltamem_shuffled"): "different prompts (history vs question only) and states: "
    "favours the prompt holding the history; it does not separate recall",
}


def separates(deltamem: str, versus: str) -> str:
    """What comparing ``deltamem`` with ``versus`` isolates (a generic line for pairs not in :data:`SEPARATES`)."""
    from pipeline.eval.conditions import CONDITIONS

    if (deltamem, versus) in SEPARATES:
        return SEPARATES[(deltamem, versus)]
    d, v = CONDITIONS.get(deltamem), CONDITIONS.get(versus)
    dd, vd = (d.description if d else deltamem), (v.description if v else versus)
    return f"{dd} vs {vd} (same questions)"


def caption(spec: ClaimSpec) -> str:
    """The caption line of a claim: its own ``separates``, else what the comparison isolates."""
    return spec.separates or separates(spec.deltamem, spec.versus)


# ------------------------------------------------------------------------------------------- formatting
def fmt(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return f"{x:.{digits}f}"


NA = "n/a"  # an undefined ratio (0/0: both conditions score nothing), in every output


def fmt_ratio(x: float | None) -> str:
    if x is None:
        return "–"
    return NA if math.isnan(x) else ("∞" if math.isinf(x) and x > 0 else f"{fmt(x, 2)}×")


def mean_defined(values: Sequence[float]) -> float:
    """Mean of the defined (non-NaN) ratios; NaN when none is defined."""
    defined = [v for v in values if not math.isnan(v)]
    return sum(defined) / len(defined) if defined else math.nan


def json_value(x: Any) -> Any:
    """A summary number for JSON: NaN → "n/a" (undefined ratio), ±∞ → None, others as they are."""
    if isinstance(x, float) and math.isnan(x):
        return NA
    if isinstance(x, float) and math.isinf(x):
        return None
    return x


def mlflow_payload(summary: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, tags) for MLflow: numbers as metrics; "n/a" values (no number to log) as tags."""
    metrics = {k: float(v) for k, v in summary.items() if isinstance(v, int | float) and math.isfinite(v)}
    tags = {k: NA for k, v in summary.items() if v == NA}
    return metrics, tags


def fmt_interval(iv: Interval, digits: int = 3, ratio: bool = False) -> str:
    if ratio and math.isnan(iv.value):
        return NA
    f = fmt_ratio if ratio else (lambda v: fmt(v, digits))
    return f"{f(iv.value)} [{f(iv.low)}, {f(iv.high)}]"


def fmt_bytes(x: float) -> str:
    if x is None or math.isnan(x):
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(x) < 1024 or unit == "GiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{x:.1f} GiB"


def fmt_p(p: float) -> str:
    return "–" if math.isnan(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")


# ------------------------------------------------------------------------------------------- analysis
@dataclass
class Comparison:
    """A δ-mem condition against another condition on one task."""

    deltamem: UnitResult
    other: UnitResult
    stats: PairedComparison


def paired(a: UnitResult, b: UnitResult, p: ReportParams) -> PairedComparison | None:
    ids = sorted(set(a.scores) & set(b.scores))
    if not ids:
        return None
    return paired_comparison(
        [a.scores[i] for i in ids],
        [b.scores[i] for i in ids],
        resamples=p.bootstrap,
        permutations=p.permutations,
        seed=p.seed,
        confidence=p.confidence,
    )


@dataclass
class Analysis:
    units: list[UnitResult]
    tasks: list[str]
    labels: list[str]  # condition labels in display order
    intervals: dict[tuple[str, str], Interval]  # (label, task) → headline mean and interval
    comparisons: list[Comparison]
    best_baseline: dict[str, str]  # task → label of the best non-δ-mem baseline
    vs_reference: dict[tuple[str, str], PairedComparison]  # (δ label, task)
    vs_best: dict[tuple[str, str], PairedComparison]


def _order(units: Sequence[UnitResult], p: ReportParams) -> list[str]:
    def rank(u: UnitResult) -> tuple[int, int, str]:
        if not u.is_deltamem:
            pos = p.baselines.index(u.condition) if u.condition in p.baselines else len(p.baselines)
            return (0, pos, u.label)
        if u.condition in p.controls:
            return (2, 0, u.label)
        return (1, 0 if u.condition == p.claim else 1, u.label)

    seen: dict[str, tuple[int, int, str]] = {}
    for u in units:
        seen.setdefault(u.label, rank(u))
    return sorted(seen, key=lambda k: seen[k])


def analyse(units: list[UnitResult], p: ReportParams) -> Analysis:
    tasks = sorted({u.task for u in units})
    intervals = {}
    for u in units:
        if u.scores:
            intervals[(u.label, u.task)] = mean_interval(list(u.scores.values()), p.bootstrap, p.seed, p.confidence)
    comparisons, vs_ref, vs_best, best = [], {}, {}, {}
    for task in tasks:
        base_units = [u for u in units if u.task == task and not u.is_deltamem and u.scores]
        if base_units:
            best[task] = max(base_units, key=lambda u: (sum(u.scores.values()) / len(u.scores), u.label)).label
        others = [u for u in units if u.task == task and u.scores and (not u.is_deltamem or u.condition in p.controls)]
        for d in (u for u in units if u.task == task and u.is_deltamem and u.condition not in p.controls):
            if not d.scores:
                continue
            for o in others:
                if o.variant not in (d.variant, "base") and o.is_deltamem:
                    continue  # a control is compared with its own variant only
                st = paired(d, o, p)
                if st is None:
                    continue
                comparisons.append(Comparison(d, o, st))
                if o.condition == p.reference:
                    vs_ref[(d.label, task)] = st
                if best.get(task) == o.label:
                    vs_best[(d.label, task)] = st
    return Analysis(units, tasks, _order(units, p), intervals, comparisons, best, vs_ref, vs_best)


# ------------------------------------------------------------------------------------------- plots
def _pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display on servers and CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_headline(a: Analysis, path: Path, controls: Sequence[str] = ()) -> None:
    plt = _pyplot()
    n_tasks = len(a.tasks)
    fig, axes = plt.subplots(1, n_tasks, figsize=(max(5.0, 4.5 * n_tasks), 0.45 * len(a.labels) + 1.6), squeeze=False)
    for ax, task in zip(axes[0], a.tasks, strict=True):
        labels = [lb for lb in a.labels if (lb, task) in a.intervals]
        ivs = [a.intervals[(lb, task)] for lb in labels]
        ys = range(len(labels))
        colors = [
            "#999999"
            if lb.split("/")[-1] in controls
            else "#c44e52"
            if lb.split("/")[-1].startswith("deltamem")
            else "#4c72b0"
            for lb in labels
        ]
        ax.barh(list(ys), [iv.value for iv in ivs], color=colors, alpha=0.85)
        ax.errorbar(
            [iv.value for iv in ivs],
            list(ys),
            xerr=[[iv.value - iv.low for iv in ivs], [iv.high - iv.value for iv in ivs]],
            fmt="none",
            ecolor="black",
            capsize=3,
        )
        ax.set_yticks(list(ys))
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()
        unit = next(u for u in a.units if u.task == task)
        ax.set_title(f"{task} ({unit.metric}, 95% CI)", fontsize=9)
        ax.set_xlim(left=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_training(train: Sequence[Any], path: Path) -> bool:
    rows = [t for t in train if t.history]
    if not rows:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for t in rows:
        steps = [r["step"] for r in t.history if "answer_ce" in r]
        ax.plot(steps, [r["answer_ce"] for r in t.history if "answer_ce" in r], label=f"{t.variant} answer CE")
        for key, style in (
            ("val_answer_ce/written", "--"),
            ("val_answer_ce/shuffled", ":"),
            ("val_answer_ce/none", "-."),
        ):
            if key in t.metrics and steps:
                ax.axhline(t.metrics[key], linestyle=style, linewidth=1, color="gray")
                ax.annotate(f"{t.variant} held-out, {key.split('/')[-1]} state", (steps[0], t.metrics[key]), fontsize=7)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("answer cross-entropy (nats)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def memory_rows(units: Sequence[UnitResult]) -> list[dict[str, Any]]:
    """Per (task, variant): the δ-mem state bytes (variants differ: MSW keeps several sub-states) beside the
    KV cache of the task's history; the rows of ``plots/memory.csv`` and of the memory plot."""
    state: dict[tuple[str, str], float] = {}
    kv: dict[str, float] = {}
    for u in units:
        k = u.metrics.get("cost/kv_bytes_history")
        if isinstance(k, int | float) and math.isfinite(k) and k > 0:
            kv[u.task] = max(kv.get(u.task, 0.0), float(k))
        s_bytes = u.metrics.get("cost/state_bytes")
        if u.is_deltamem and isinstance(s_bytes, int | float) and math.isfinite(s_bytes) and s_bytes > 0:
            state[(u.task, u.variant)] = max(state.get((u.task, u.variant), 0.0), float(s_bytes))
    return [
        {"task": t, "variant": v, "state_bytes": b, "kv_bytes_history": kv[t]}
        for (t, v), b in sorted(state.items())
        if t in kv
    ]


def _plot_memory(rows: Sequence[dict[str, Any]], path: Path) -> bool:
    if not rows:
        return False
    plt = _pyplot()
    tasks = sorted({r["task"] for r in rows})
    variants = sorted({r["variant"] for r in rows})
    width = 0.8 / (len(variants) + 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(tasks) * (len(variants) + 1)), 3.4))
    for i, v in enumerate(variants):
        xs = [x for x, t in enumerate(tasks) if any(r["task"] == t and r["variant"] == v for r in rows)]
        ys = [next(r["state_bytes"] for r in rows if r["task"] == tasks[x] and r["variant"] == v) for x in xs]
        ax.bar([x - 0.4 + width * (i + 0.5) for x in xs], ys, width=width, label=f"δ-mem state {v}")
    kv = [next(r["kv_bytes_history"] for r in rows if r["task"] == t) for t in tasks]
    ax.bar(
        [x + 0.4 - width / 2 for x in range(len(tasks))], kv, width=width, color="gray", label="KV cache of the history"
    )
    ax.set_yscale("log")
    ax.set_xticks(list(range(len(tasks))))
    ax.set_xticklabels(tasks)
    ax.set_ylabel("bytes per conversation (log)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------- document
def _summary(a: Analysis, train: Sequence[Any], p: ReportParams) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for (label, task), iv in a.intervals.items():
        out[f"{label}/{task}/score"] = iv.value
        out[f"{label}/{task}/score_ci_low"] = iv.low
        out[f"{label}/{task}/score_ci_high"] = iv.high
    for c in a.comparisons:
        key = f"{c.deltamem.label}/{c.deltamem.task}/vs/{c.other.label}"
        out[f"{key}/ratio"] = c.stats.ratio.value
        out[f"{key}/ratio_ci_low"] = c.stats.ratio.low
        out[f"{key}/ratio_ci_high"] = c.stats.ratio.high
        out[f"{key}/diff"] = c.stats.difference.value
        out[f"{key}/p_value"] = c.stats.p_value
    for label in {lb for lb, _ in a.vs_reference}:
        ratios = [st.ratio.value for (lb, _), st in a.vs_reference.items() if lb == label]
        out[f"{label}/mean_ratio_vs_{p.reference}"] = mean_defined(ratios)
    for t in train:
        for k, v in t.metrics.items():
            if isinstance(v, int | float):
                out[f"train/{t.variant}/{k}"] = v
    return {k: json_value(v) for k, v in sorted(out.items())}


def _label(variant: str, condition: str) -> str:
    return condition if variant == BASE_VARIANT else f"{variant}/{condition}"


def claims(a: Analysis, p: ReportParams) -> list[dict[str, Any]]:
    """The checked statements that head the report: every claim of :meth:`ReportParams.claim_specs`, for
    every δ-mem variant, on its tasks. A row with ``evaluated: False`` (``holds: None``) names a claim whose
    two conditions were not both evaluated for that variant and task."""
    from pipeline.eval.conditions import CONDITIONS

    units = {(u.variant, u.condition, u.task): u for u in a.units if u.scores}
    done = {(c.deltamem.label, c.other.label, c.deltamem.task): c.stats for c in a.comparisons}
    variants = sorted({u.variant for u in a.units if u.is_deltamem})
    out = []
    for spec in p.claim_specs():
        same_variant = CONDITIONS[spec.versus].uses_adapter
        tasks = spec.tasks or [
            t
            for t in a.tasks
            if any(k[1] == spec.deltamem and k[2] == t for k in units)
            and any(k[1] == spec.versus and k[2] == t for k in units)
        ]
        for task in tasks:
            for variant in variants:
                other_variant = variant if same_variant else BASE_VARIANT
                d = units.get((variant, spec.deltamem, task))
                o = units.get((other_variant, spec.versus, task))
                row: dict[str, Any] = {
                    "claim": spec.title,
                    "separates": caption(spec),
                    "task": task,
                    "variant": variant,
                    "deltamem": _label(variant, spec.deltamem),
                    "versus": _label(other_variant, spec.versus),
                }
                st = None
                if d is not None and o is not None:
                    st = done.get((d.label, o.label, task)) or paired(d, o, p)
                if st is None:
                    row.update(evaluated=False, holds=None)
                    out.append(row)
                    continue
                row.update(
                    evaluated=True,
                    n=st.n,
                    ratio=st.ratio,
                    difference=st.difference,
                    p_value=st.p_value,
                    holds=bool(st.difference.low > 0 and st.ratio.excludes(1.0)),
                )
                out.append(row)
    return out


def build_document(a: Analysis, train: Sequence[Any], p: ReportParams, plots: dict[str, Path], out: Path) -> Document:
    doc = Document(p.title)
    conf = f"{round(p.confidence * 100)}%"
    n_q = {u.task: len(u.scores) for u in a.units}
    doc.add(
        Paragraph(
            f"Tasks: {', '.join(f'`{t}` ({n_q[t]} questions)' for t in a.tasks)}. Conditions: "
            + ", ".join(f"`{lb}`" for lb in a.labels)
            + f". Intervals are {conf} bootstrap intervals over questions ({p.bootstrap} resamples); comparisons "
            f"are paired on the same questions (p: two-sided sign-flip permutation test). Ratios are δ-mem ÷ "
            f"baseline headline scores, as the paper reports them."
        )
    )
    # --- claims
    cl = claims(a, p)
    if cl:
        doc.add(Heading("Claims checked"))
        rows = []
        for c in cl:
            head = [c["claim"], c["task"], f"`{c['deltamem']}` > `{c['versus']}`"]
            if not c["evaluated"]:
                rows.append([*head, "–", "–", "–", "–", "not evaluated"])
                continue
            rows.append(
                [
                    *head,
                    str(c["n"]),
                    fmt_interval(c["ratio"], ratio=True),
                    fmt_interval(c["difference"]),
                    fmt_p(c["p_value"]),
                    "**yes**" if c["holds"] else "no",
                ]
            )
        specs = dict.fromkeys(
            (c["claim"], c["separates"], c["deltamem"].split("/")[-1], c["versus"].split("/")[-1]) for c in cl
        )
        what = " ".join(f"**{t}** (`{d}` vs `{v}`): {s}." for t, s, d, v in specs)
        doc.add(
            Table(
                ["claim", "task", "comparison", "n", f"ratio [{conf} CI]", f"difference [{conf} CI]", "p", "holds"],
                rows,
                caption=f"A claim holds when the {conf} interval of the difference lies above 0 (then the ratio's "
                f"interval excludes 1.0×); n/a: 0/0, both score nothing. What each comparison separates — {what}",
                align_right_from=3,
            )
        )
    # --- headline
    doc.add(Heading("Headline scores"))

    def _scoring(t: str) -> str:  # the scoring protocol(s) behind the task's numbers (evaluate's metrics.json)
        return "/".join(sorted({str(u.metrics.get("scoring") or "official") for u in a.units if u.task == t}))

    header = ["condition"] + [
        f"{t} ({next(u.metric for u in a.units if u.task == t)}, scoring {_scoring(t)})" for t in a.tasks
    ]
    rows = []
    for lb in a.labels:
        row = [f"`{lb}`"]
        for t in a.tasks:
            iv = a.intervals.get((lb, t))
            row.append(fmt_interval(iv) if iv else "–")
        rows.append(row)
    doc.add(
        Table(
            header,
            rows,
            caption=f"Mean headline score [{conf} CI] per task; `scoring` names the protocol that scored it "
            "(`official`: the benchmark's own code; `delta-mem`: the δ-mem paper's; docs/EVALUATION.md).",
        )
    )
    if "headline" in plots:
        doc.add(Image(plots["headline"], "Headline scores with 95% intervals", os.path.relpath(plots["headline"], out)))
    # --- every overall metric of the task, not only the headline
    for t in a.tasks:
        units = [u for u in a.units if u.task == t]
        keys = sorted(
            {
                k
                for u in units
                for k, v in u.metrics.items()
                if "/" not in k and k not in ("headline", "n") and isinstance(v, int | float)
            }
        )
        if len(keys) > 1:
            rows = []
            for lb in a.labels:
                u = next((u for u in units if u.label == lb), None)
                if u is not None:
                    rows.append([f"`{lb}`"] + [fmt(float(u.metrics.get(k, math.nan))) for k in keys])
            doc.add(
                Table(
                    ["condition", *[f"**{k}**" if k == units[0].metric else k for k in keys]],
                    rows,
                    caption=f"{t}: every metric the task reports (headline in bold).",
                )
            )
    # --- ratios
    deltas = [
        lb for lb in a.labels if (lb.split("/")[-1].startswith("deltamem") and lb.split("/")[-1] not in p.controls)
    ]
    if deltas:
        doc.add(Heading("δ-mem relative to the baselines"))
        rows = []
        for lb in deltas:
            ratios_ref = []
            for t in a.tasks:
                ref, best = a.vs_reference.get((lb, t)), a.vs_best.get((lb, t))
                if ref is None and best is None:
                    continue
                if ref is not None:
                    ratios_ref.append(ref.ratio.value)
                rows.append(
                    [
                        f"`{lb}`",
                        t,
                        fmt_interval(ref.ratio, ratio=True) if ref else "–",
                        f"`{a.best_baseline.get(t, '–')}`",
                        fmt_interval(best.ratio, ratio=True) if best else "–",
                    ]
                )
            if len(ratios_ref) > 1:
                rows.append([f"`{lb}`", "**mean over tasks**", fmt_ratio(mean_defined(ratios_ref)), "", ""])
        doc.add(
            Table(
                ["δ-mem condition", "task", f"÷ `{p.reference}` [{conf} CI]", "best baseline", f"÷ best [{conf} CI]"],
                rows,
                caption="Ratios of headline scores on the same questions; n/a: 0/0 (both score nothing), left out of "
                "the mean over tasks; ∞: only the baseline scores nothing.",
                align_right_from=2,
            )
        )
    # --- paired tests
    if a.comparisons:
        doc.add(Heading("Paired comparisons"))
        rows = [
            [
                f"`{c.deltamem.label}`",
                c.deltamem.task,
                f"`{c.other.label}`",
                str(c.stats.n),
                fmt(c.stats.mean_x),
                fmt(c.stats.mean_y),
                fmt_interval(c.stats.difference),
                fmt_p(c.stats.p_value),
            ]
            for c in a.comparisons
        ]
        doc.add(
            Table(
                ["δ-mem", "task", "versus", "n", "δ-mem", "other", f"difference [{conf} CI]", "p"],
                rows,
                align_right_from=3,
            )
        )
    # --- categories
    for t in a.tasks:
        units = [u for u in a.units if u.task == t and u.categories]
        cats = sorted({c for u in units for c in u.categories.values()})
        if len(cats) < 2:
            continue
        doc.add(Heading(f"{t}: per category", 3))
        header = ["condition"] + [f"{c} (n={sum(1 for v in units[0].categories.values() if v == c)})" for c in cats]
        rows = []
        for lb in a.labels:
            u = next((u for u in units if u.label == lb), None)
            if u is None:
                continue
            by: dict[str, list[float]] = defaultdict(list)
            for ex, c in u.categories.items():
                if ex in u.category_scores:
                    by[c].append(u.category_scores[ex])
            rows.append([f"`{lb}`"] + [fmt(sum(by[c]) / len(by[c])) if by[c] else "–" for c in cats])
        note = (
            "Category `adversarial` (LoCoMo category 5) is scored as abstention and left out of the headline, as upstream."
            if "adversarial" in cats
            else ""
        )
        doc.add(Table(header, rows, caption=f"Mean {units[0].metric} per category. {note}".strip()))
    # --- training
    if train:
        doc.add(Heading("Training"))
        rows = []
        for tr in train:
            m = tr.metrics
            rows.append(
                [
                    tr.variant,
                    str(int(m.get("steps", 0))),
                    fmt(m.get("final_loss", math.nan)),
                    fmt(m.get("val_answer_ce/written", math.nan)),
                    fmt(m.get("val_answer_ce/shuffled", math.nan)),
                    fmt(m.get("val_answer_ce/none", math.nan)),
                    fmt(m.get("train_seconds", math.nan), 0),
                    fmt(m.get("tokens_per_s", math.nan), 0),
                    str(int(m.get("trainable_parameters", 0))),
                ]
            )
        doc.add(
            Table(
                [
                    "variant",
                    "steps",
                    "final loss",
                    "held-out CE written",
                    "shuffled",
                    "none",
                    "train s",
                    "tokens/s",
                    "params",
                ],
                rows,
                caption="Held-out answer cross-entropy with the conversation's own state (written), another "
                "conversation's state (shuffled) and no state (none).",
            )
        )
        if "training" in plots:
            doc.add(Image(plots["training"], "Training curves", os.path.relpath(plots["training"], out)))
    # --- cost
    doc.add(Heading("Cost"))
    rows = []
    for u in sorted(a.units, key=lambda u: (u.task, a.labels.index(u.label))):
        m = u.metrics
        rows.append(
            [
                f"`{u.label}`",
                u.task,
                str(int(m.get("cost/questions", 0))),
                fmt(m.get("cost/forward_tokens", math.nan), 0),
                fmt(m.get("cost/forward_tokens_per_question", math.nan), 1),
                fmt(m.get("cost/wall_s", math.nan), 1),
                fmt_bytes(m.get("cost/peak_memory_bytes", math.nan)),
                fmt_bytes(m.get("cost/state_bytes", math.nan)) if u.is_deltamem else "–",
                fmt_bytes(m.get("cost/kv_bytes_history", math.nan)),
            ]
        )
    doc.add(
        Table(
            [
                "condition",
                "task",
                "questions",
                "backbone tokens",
                "tokens/question",
                "wall s",
                "peak memory",
                "δ-mem state",
                "KV cache of a history",
            ],
            rows,
            caption="Backbone tokens = every position the backbone processed (writes, prefills, decoding). "
            "The δ-mem state is fixed-size; the KV cache grows with the history.",
            align_right_from=2,
        )
    )
    if "memory" in plots:
        doc.add(Image(plots["memory"], "δ-mem state per variant vs KV cache", os.path.relpath(plots["memory"], out)))
    return doc


RESULTS_SECTIONS = ("Claims checked", "Headline scores", "Training")


def excerpt(doc: Document, headings: Sequence[str]) -> Document:
    """The first paragraph, and the tables and paragraphs under ``headings`` (no images): ``results.md``,
    which ``python -m pipeline.report.readme`` copies into the README's results section."""
    out = Document(doc.title)
    keep = False
    for i, block in enumerate(doc.blocks):
        if i == 0 and isinstance(block, Paragraph):
            out.add(block)
        elif isinstance(block, Heading):
            keep = block.text in headings
            if keep:
                out.add(Heading(block.text, 3))
        elif keep and not isinstance(block, Image):
            out.add(block)
    return out


# ------------------------------------------------------------------------------------------- stage
@dataclass
class ReportResult:
    out_dir: Path
    summary: dict[str, Any]
    claims: list[dict[str, Any]]  # the evaluated claims (see :func:`claims`)
    not_evaluated: list[dict[str, Any]] = field(default_factory=list)  # claims whose conditions are missing


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def run_report(p: ReportParams, root: Path) -> ReportResult:
    """Build the report from the stage outputs under ``root``; replaces ``<root>/<out_dir>`` atomically."""
    units = collect_eval(root / p.eval_dir)
    train = collect_train(root / p.train_dir, root / p.models_dir)
    a = analyse(units, p)
    final = root / p.out_dir
    with atomic_dir(final) as tmp:
        plots_dir = tmp / "plots"
        plots_dir.mkdir()
        plots: dict[str, Path] = {}
        _plot_headline(a, plots_dir / "headline.png", p.controls)
        plots["headline"] = plots_dir / "headline.png"
        if _plot_training(train, plots_dir / "training.png"):
            plots["training"] = plots_dir / "training.png"
        mem_rows = memory_rows(units)
        if _plot_memory(mem_rows, plots_dir / "memory.png"):
            plots["memory"] = plots_dir / "memory.png"
            _write_csv(plots_dir / "memory.csv", mem_rows)
        _write_csv(
            plots_dir / "headline.csv",
            [
                {"condition": lb, "task": t, "score": iv.value, "ci_low": iv.low, "ci_high": iv.high}
                for (lb, t), iv in sorted(a.intervals.items())
            ],
        )
        for tr in train:
            if tr.history:
                _write_csv(plots_dir / "training" / f"{tr.variant}.csv", tr.history)
        doc = build_document(a, train, p, plots, tmp)
        (tmp / "report.md").write_text(doc.to_markdown())
        (tmp / "report.html").write_text(doc.to_html())
        (tmp / "results.md").write_text(excerpt(doc, RESULTS_SECTIONS).to_markdown())
        summary = _summary(a, train, p)
        every = claims(a, p)
        cl = [c for c in every if c["evaluated"]]
        summary_out = {
            **summary,
            **{f"claim/{c['deltamem']}/{c['task']}/gt/{c['versus']}": int(c["holds"]) for c in cl},
        }
        (tmp / "summary.json").write_text(json.dumps(summary_out, indent=2, sort_keys=True) + "\n")
    return ReportResult(final, summary_out, cl, [c for c in every if not c["evaluated"]])
