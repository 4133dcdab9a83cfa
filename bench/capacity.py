"""How much does a rank-r δ-mem state remember? The capacity study on the synthetic set (issue 18).

A grid of cells, each one real training run of the pipeline's trainer (:func:`pipeline.train.trainer.train`)
on synthetic dialogues that state F facts, then held-out evaluation with the trainer's episode code:

    facts per dialogue F ∈ {1, 2, 4, 8}   (larger F only while recall survives at the smaller one)
    write mode        M ∈ {TSW, SSW, MSW (H = 4 sub-states)}
    rank              r ∈ {8, 16}

Data per F (closed answer sets, as in the embedded default): one session, single-hop questions only, no
distractors; relations the first max(1, min(F, 6)) of city, job, dog, dish, hobby, degree; each relation's
first max(8, 2F + 1) values (the generator keeps values distinct within a dialogue); 640 training and 64
validation dialogues (people disjoint from training), i.e. 640·F training and 64·F held-out questions.

Budget per cell (fixed, the same for every cell; ``--steps`` overrides it): 120 optimiser steps × 8 episodes,
AdamW lr 1e-2, cosine with 10 % warm-up, α 64, branches q/o, ``base_slice_fixed``; seeds as in params.yaml
(synthetic seed 1234, optimiser seed 0, deterministic algorithms), bootstrap seed 0 with 2000 resamples.

Held-out metrics per cell, for memory = written (the dialogue's own state), shuffled (another dialogue's
state, :func:`pipeline.train.trainer.shuffled_episodes`) and none (the frozen backbone):

* answer CE per question c_i = (1/n_i) Σ_t −log p(a_t | ·) over the answer tokens (incl. the end-of-turn
  marker), its mean with a 95 % percentile-bootstrap interval, and the token-weighted CE Σ_i n_i c_i / Σ_i n_i
  (= :func:`pipeline.train.trainer.evaluate_loss`, the train stage's figure);
* exact-match recall e_i = 1[argmax p(· | prefix) = a_t for every answer token t], which is exactly "greedy
  decoding emits the answer and then ends the turn"; mean with interval;
* the recall gap Δ = ē_written − ē_shuffled and the CE gap c̄_shuffled − c̄_written with paired-bootstrap 95 %
  intervals over questions (:func:`pipeline.stats.paired_comparison`). Recall survives at F while the
  gap's interval excludes zero.

Each finished cell keeps ``bench/results/capacity/<cell>/metrics.json`` (written last, atomically: its presence
marks the cell done) and ``adapter/``; a killed study resumes where it stopped (finished cells are skipped, a
cell killed mid-training resumes from its last checkpoint, every 20 steps). All finished cells are collected
into ``bench/results/capacity_cpu.json`` and ``capacity_cpu.png`` (recall gap vs facts, one line per write
mode and rank, with the intervals).

    python bench/capacity.py            # the whole grid
    python bench/capacity.py --quick    # F ∈ {1, 2}, TSW and SSW, r = 8 (4 cells)
    python bench/capacity.py --cells f2-SSW-r8 f4-TSW-r8 --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results"
RELATION_ORDER = ("city", "job", "dog", "dish", "hobby", "degree")
FULL_GRID = {"facts": (1, 2, 4, 8), "modes": ("TSW", "SSW", "MSW"), "ranks": (8, 16)}
QUICK_GRID = {"facts": (1, 2), "modes": ("TSW", "SSW"), "ranks": (8,)}
CELL_RE = re.compile(r"^f(\d+)-(TSW|SSW|MSW)-r(\d+)$")


class UsageError(Exception):
    """Bad command-line input: one line, exit status 2."""


@dataclass(frozen=True)
class Budget:
    """The fixed per-cell training budget and data sizes (stated in every cell's metrics)."""

    steps: int = 120
    batch_size: int = 8
    lr: float = 1e-2
    alpha: float = 64.0
    warmup_ratio: float = 0.1
    train_dialogues: int = 640
    validation_dialogues: int = 64
    synthetic_seed: int = 1234
    optim_seed: int = 0
    bootstrap: int = 2000
    bootstrap_seed: int = 0
    write_length: int = 512
    read_length: int = 128
    checkpoint_every: int = 20


@dataclass(frozen=True)
class Cell:
    facts: int
    mode: str
    rank: int

    @property
    def name(self) -> str:
        return f"f{self.facts}-{self.mode}-r{self.rank}"

    @classmethod
    def parse(cls, text: str) -> Cell:
        m = CELL_RE.match(text)
        if not m or not 1 <= int(m.group(1)) <= 8 or int(m.group(3)) < 1:
            raise UsageError(
                f"--cells: {text!r} is not a cell name; expected f<1..8>-<TSW|SSW|MSW>-r<rank>, e.g. f2-SSW-r8"
            )
        return cls(int(m.group(1)), m.group(2), int(m.group(3)))


def grid_cells(grid: dict[str, Sequence[Any]]) -> list[Cell]:
    """Cells in run order: fewest facts first, then mode, then rank (so a partial study covers small F)."""
    return [Cell(f, m, r) for f in grid["facts"] for r in grid["ranks"] for m in grid["modes"]]


def synthetic_options(facts: int, budget: Budget) -> dict[str, Any]:
    """The generator settings of a cell (see the module doc)."""
    return {
        "seed": budget.synthetic_seed,
        "dialogues": {"train": budget.train_dialogues, "validation": budget.validation_dialogues, "test": 1},
        "sessions": 1,
        "facts_per_dialogue": facts,
        "distractor_facts": 0,
        "distractor_turns": 0,
        "ack_prob": 0.0,
        "category_weights": {"single-hop": 1},
        "relations": list(RELATION_ORDER[: max(1, min(facts, len(RELATION_ORDER)))]),
        "max_values": max(8, 2 * facts + 1),
    }


def deltamem_options(cell: Cell, budget: Budget) -> dict[str, Any]:
    return {
        "rank": cell.rank,
        "alpha": budget.alpha,
        "branches": ["q", "o"],
        "output_init": "base_slice_fixed",
        "write_mode": cell.mode,
        **({"num_substates": 4} if cell.mode == "MSW" else {}),
    }


def optim_options(budget: Budget) -> dict[str, Any]:
    return {
        "steps": budget.steps,
        "batch_size": budget.batch_size,
        "grad_accum": 1,
        "lr": budget.lr,
        "schedule": "cosine",
        "warmup_ratio": budget.warmup_ratio,
        "seed": budget.optim_seed,
        "checkpoint_every": budget.checkpoint_every if budget.checkpoint_every < budget.steps else 0,
        "keep_checkpoints": 1,
        "deterministic": True,
    }


def cell_settings(cell: Cell, budget: Budget, backbone: str) -> dict[str, Any]:
    """Everything a finished cell was computed with; a stored cell with other settings is recomputed."""
    return {
        "cell": cell.name,
        "backbone": backbone,
        "synthetic": synthetic_options(cell.facts, budget),
        "deltamem": deltamem_options(cell, budget),
        "optim": optim_options(budget),
        "write_length": budget.write_length,
        "read_length": budget.read_length,
        "bootstrap": {"resamples": budget.bootstrap, "seed": budget.bootstrap_seed},
    }


def loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


# --- evaluation -----------------------------------------------------------------------------------------
def per_question(model: Any, episodes: Sequence[Any], pad_id: int, memory: str, batch_size: int = 4) -> dict[str, list]:
    """Per-question answer CE (mean over its answer tokens), answer-token count and exact match.

    ``shuffled``: each question read against another dialogue's state (:func:`shuffled_episodes`), the
    trainer's control; ``written`` / ``none`` as in :func:`pipeline.train.trainer.episode_logits`.
    """
    import torch
    import torch.nn.functional as F

    from pipeline.data.tokenize import IGNORE_INDEX
    from pipeline.train.trainer import collate_episodes, episode_logits, shuffled_episodes

    if memory == "shuffled":
        episodes, memory = shuffled_episodes(episodes), "written"
    ce, tokens, em = [], [], []
    with torch.no_grad():
        for start in range(0, len(episodes), batch_size):
            batch = collate_episodes(episodes[start : start + batch_size], pad_id)
            logits, labels = episode_logits(model, batch, memory)
            logits, labels = logits[:, :-1].float(), labels[:, 1:]
            nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
            mask = labels != IGNORE_INDEX
            hit = (logits.argmax(-1) == labels) | ~mask
            for i in range(labels.shape[0]):
                n = int(mask[i].sum())
                ce.append(float(nll[i][mask[i]].sum()) / max(n, 1))
                tokens.append(n)
                em.append(float(bool(hit[i].all())) if n else 0.0)
    return {"ce": ce, "tokens": tokens, "em": em}


def summarise(rows: dict[str, dict[str, list]], budget: Budget) -> dict[str, Any]:
    """Means with bootstrap intervals per condition, and the paired written-vs-shuffled gaps."""
    from pipeline.stats import mean_interval, paired_comparison

    B, seed = budget.bootstrap, budget.bootstrap_seed

    def interval(values: list[float]) -> dict[str, float]:
        i = mean_interval(values, B, seed)
        return {"mean": i.value, "low": i.low, "high": i.high}

    out: dict[str, Any] = {"questions": len(rows["written"]["ce"])}
    for memory, r in rows.items():
        weighted = sum(c * n for c, n in zip(r["ce"], r["tokens"], strict=True)) / max(1, sum(r["tokens"]))
        out[memory] = {"answer_ce": interval(r["ce"]), "answer_ce_token_weighted": weighted, "em": interval(r["em"])}
    for key, x, y in (("em_gap", "written", "shuffled"), ("ce_gap", "shuffled", "written")):
        field = "em" if key == "em_gap" else "ce"
        c = paired_comparison(rows[x][field], rows[y][field], resamples=B, permutations=10000, seed=seed)
        out[key] = {"mean": c.difference.value, "low": c.difference.low, "high": c.difference.high, "p": c.p_value}
    out["recall_survives"] = bool(out["em_gap"]["low"] > 0)
    return out


# --- one cell ---------------------------------------------------------------------------------------------
def write_json_atomic(path: Path, data: Any) -> None:
    from pipeline.common import atomic_write_json as write

    write(path, data, sort_keys=False)


def run_cell(
    cell: Cell,
    budget: Budget,
    out_root: Path,
    load_model: Callable[[], tuple[Any, Any]],
    backbone: str,
    progress: bool = True,
) -> dict[str, Any]:
    """Train and evaluate one cell into ``out_root/<cell>/``; returns its metrics (metrics.json written last)."""
    import torch

    from deltamem import DeltaMemConfig, load_adapter
    from pipeline.data.synthetic import config_from_options, generate_split
    from pipeline.data.tokenize import Packer
    from pipeline.train.trainer import TrainConfig, train

    settings = cell_settings(cell, budget, backbone)
    cell_dir = out_root / cell.name
    stored = cell_dir / "settings.json"
    if stored.is_file() and json.loads(stored.read_text()) != settings:
        print(f"{cell.name}: stored partial run has other settings; starting afresh", file=sys.stderr)
        shutil.rmtree(cell_dir)
    write_json_atomic(stored, settings)

    load_start, t0 = loadavg(), time.time()
    model, tok = load_model()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    syn = config_from_options(settings["synthetic"])
    packer = Packer(tok, write_length=budget.write_length, read_length=budget.read_length, overflow="truncate")
    train_eps = [packer.pack(e) for e in generate_split(syn, "train")]
    val_eps = [packer.pack(e) for e in generate_split(syn, "validation")]
    config = DeltaMemConfig.from_dict(settings["deltamem"])

    summary_file = cell_dir / "training_summary.json"
    if (cell_dir / "adapter").is_dir() and summary_file.is_file():  # trained, killed during evaluation
        model = load_adapter(model, cell_dir / "adapter")
        summary = json.loads(summary_file.read_text())
        print(f"{cell.name}: adapter already trained; evaluating", file=sys.stderr)
    else:
        cfg = TrainConfig(**settings["optim"])
        result = train(model, train_eps, pad, config, cfg, cell_dir, resume="auto", progress=progress)
        summary = result.summary
    train_wall = time.time() - t0
    load_train = loadavg()

    t1 = time.time()
    model.eval()
    rows = {m: per_question(model, val_eps, pad, m) for m in ("written", "shuffled", "none")}
    stats = summarise(rows, budget)
    with torch.no_grad():  # the bytes of one conversation's state, measured on a real write
        from pipeline.train.trainer import collate_episodes

        b = collate_episodes(val_eps[:1], pad)
        seg = b["segment_ids"] if cell.mode == "SSW" else None
        state_bytes = model.write_memory(b["write_ids"], attention_mask=b["write_mask"], segment_ids=seg).nbytes

    metrics = {
        "cell": cell.name,
        "facts": cell.facts,
        "write_mode": cell.mode,
        "rank": cell.rank,
        "state_bytes": int(state_bytes),
        "train": {k: summary.get(k) for k in ("steps", "final_loss", "final_answer_ce", "train_seconds", "tokens")},
        "trainable_parameters": summary.get("trainable_parameters"),
        "train_episodes": len(train_eps),
        "eval": stats,
        "per_question": rows,
        "wall_seconds": {"train": train_wall, "eval": time.time() - t1, "total": time.time() - t0},
        "loadavg": {"start": load_start, "after_train": load_train, "end": loadavg()},
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "settings": settings,
    }
    write_json_atomic(cell_dir / "metrics.json", metrics)
    return metrics


def finished(out_root: Path, cell: Cell, budget: Budget, backbone: str) -> dict[str, Any] | None:
    """The stored metrics of ``cell`` if it finished with the current settings."""
    path = out_root / cell.name / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    return metrics if metrics.get("settings") == cell_settings(cell, budget, backbone) else None


def take_lock(cell_dir: Path) -> bool:
    """Claim ``cell_dir`` for this process (``.lock`` holds the pid), so that two study processes — e.g. one
    per core — never train the same cell; a lock whose process is gone is taken over."""
    cell_dir.mkdir(parents=True, exist_ok=True)
    lock = cell_dir / ".lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
                os.kill(pid, 0)
                return pid == os.getpid()
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            except PermissionError:  # alive, another user's
                return False
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


# --- collection ------------------------------------------------------------------------------------------
def collect(
    out_root: Path, cells: Sequence[Cell], budget: Budget, backbone: str, json_out: Path, plot_out: Path
) -> dict:
    """All finished cells of ``cells`` (per-question rows left in the cell files) → JSON and plot."""
    done, pending = [], []
    for cell in cells:
        m = finished(out_root, cell, budget, backbone)
        if m is None:
            pending.append(cell.name)
        else:
            done.append({k: v for k, v in m.items() if k not in ("per_question", "settings")})
    report = {
        "what": "δ-mem capacity study: held-out recall of F facts per dialogue by write mode and rank (bench/capacity.py)",
        "budget": asdict(budget),
        "backbone": backbone,
        "device": "cpu",
        "python": platform.python_version(),
        "cells": done,
        "pending": pending,
        "first_gap_including_zero": first_failures(done),
    }
    write_json_atomic(json_out, report)
    plot(done, plot_out, budget)
    return report


def first_failures(done: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per mode/rank: the fewest facts whose recall-gap interval includes zero (None: not within the cells run)."""
    out: dict[str, Any] = {}
    for key in sorted({(c["write_mode"], c["rank"]) for c in done}):
        cells = sorted((c for c in done if (c["write_mode"], c["rank"]) == key), key=lambda c: c["facts"])
        fail = [c["facts"] for c in cells if not c["eval"]["recall_survives"]]
        out[f"{key[0]}-r{key[1]}"] = {
            "facts_run": [c["facts"] for c in cells],
            "first_failure": fail[0] if fail else None,
        }
    return out


def plot(done: Sequence[dict[str, Any]], path: Path, budget: Budget) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({(c["write_mode"], c["rank"]) for c in done}):
        cells = sorted((c for c in done if (c["write_mode"], c["rank"]) == key), key=lambda c: c["facts"])
        x = [c["facts"] for c in cells]
        y = [c["eval"]["em_gap"]["mean"] for c in cells]
        err = [
            [v - c["eval"]["em_gap"]["low"] for v, c in zip(y, cells, strict=True)],
            [c["eval"]["em_gap"]["high"] - v for v, c in zip(y, cells, strict=True)],
        ]
        ax.errorbar(
            x, y, yerr=err, marker="o", capsize=4, label=f"{key[0]} r={key[1]}", linestyle="-" if key[1] == 8 else "--"
        )
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(FULL_GRID["facts"]), [str(f) for f in FULL_GRID["facts"]])
    ax.set_xlabel("facts per dialogue")
    ax.set_ylabel("exact-match recall: written − shuffled")
    ax.set_title(f"δ-mem capacity, embedded backbone, {budget.steps} steps × {budget.batch_size} (95% CI)")
    if done:
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def markdown_table(report: dict[str, Any]) -> str:
    """The finished cells as the docs' table (means with 95 % intervals; wall time and load per cell)."""

    def ci(d: dict[str, float], fmt: str = ".2f") -> str:
        return f"{d['mean']:{fmt}} [{d['low']:{fmt}}, {d['high']:{fmt}}]"

    lines = [
        "| cell | facts | mode | r | state bytes | CE written | CE shuffled | CE none | EM written | EM shuffled "
        "| EM gap (95% CI) | wall (train + eval) | load avg (start → end) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in sorted(report["cells"], key=lambda c: (c["facts"], c["rank"], c["write_mode"])):
        e, w, la = c["eval"], c["wall_seconds"], c["loadavg"]
        lines.append(
            f"| {c['cell']} | {c['facts']} | {c['write_mode']} | {c['rank']} | {c['state_bytes']:,} "
            f"| {ci(e['written']['answer_ce'])} | {ci(e['shuffled']['answer_ce'])} | {ci(e['none']['answer_ce'])} "
            f"| {e['written']['em']['mean']:.2f} | {e['shuffled']['em']['mean']:.2f} | {ci(e['em_gap'], '+.2f')} "
            f"| {w['train'] / 60:.0f} + {w['eval'] / 60:.1f} min | {la['start'][0]:.1f} → {la['end'][0]:.1f} |"
        )
    return "\n".join(lines)


# --- driver ----------------------------------------------------------------------------------------------
def embedded_loader() -> tuple[Any, Any]:
    from deltamem.backbones import load_backbone

    return load_backbone("embedded", attn_implementation="auto")  # as train.attn_implementation's default


def run_study(
    cells: Sequence[Cell],
    budget: Budget,
    out_root: Path,
    json_out: Path,
    plot_out: Path,
    load_model: Callable[[], tuple[Any, Any]] = embedded_loader,
    backbone: str = "embedded",
    explicit: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the cells not yet finished (in order), collecting after each. Unless ``explicit``, a mode/rank stops
    growing F once recall (the gap's interval) is gone at a smaller F."""
    gone: dict[tuple[str, int], int] = {}
    every = list(dict.fromkeys([*grid_cells(FULL_GRID), *cells]))  # the collected JSON covers the whole grid
    for i, cell in enumerate(cells, 1):
        tag = f"[{i}/{len(cells)}] {cell.name}"
        m = finished(out_root, cell, budget, backbone)
        if m is None and not explicit and gone.get((cell.mode, cell.rank), 99) < cell.facts:
            print(f"{tag}: skipped (recall gone at {gone[(cell.mode, cell.rank)]} facts)", file=sys.stderr, flush=True)
            continue
        if m is None and not take_lock(out_root / cell.name):
            print(f"{tag}: skipped (another process is computing it)", file=sys.stderr, flush=True)
            continue
        if m is None:
            print(
                f"{tag}: training {budget.steps} steps × {budget.batch_size} (load {loadavg()})",
                file=sys.stderr,
                flush=True,
            )
            try:
                m = run_cell(cell, budget, out_root, load_model, backbone, progress)
            finally:
                (out_root / cell.name / ".lock").unlink(missing_ok=True)
            collect(out_root, every, budget, backbone, json_out, plot_out)
            state = "done"
        else:
            state = "already done"
        e = m["eval"]
        print(
            f"{tag}: {state}; EM written {e['written']['em']['mean']:.3f} shuffled {e['shuffled']['em']['mean']:.3f} "
            f"gap {e['em_gap']['mean']:+.3f} [{e['em_gap']['low']:+.3f}, {e['em_gap']['high']:+.3f}]; "
            f"CE {e['written']['answer_ce']['mean']:.2f}/{e['shuffled']['answer_ce']['mean']:.2f}/"
            f"{e['none']['answer_ce']['mean']:.2f}; {m['wall_seconds']['total']:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        if not e["recall_survives"]:
            gone[(cell.mode, cell.rank)] = min(cell.facts, gone.get((cell.mode, cell.rank), 99))
    return collect(out_root, every, budget, backbone, json_out, plot_out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="F ∈ {1,2}, TSW and SSW, r = 8 (4 cells)")
    ap.add_argument("--cells", nargs="+", metavar="CELL", help="run only these cells, e.g. f2-SSW-r8 f4-MSW-r16")
    ap.add_argument("--steps", type=int, help=f"optimiser steps per cell (default {Budget.steps})")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--collect", action="store_true", help="only rewrite the collected JSON and plot; train nothing")
    ap.add_argument("--table", action="store_true", help="print the collected cells as a markdown table; train nothing")
    args = ap.parse_args(argv)
    try:
        if args.steps is not None and args.steps < 1:
            raise UsageError(f"--steps {args.steps}: expected an integer >= 1")
        budget = Budget() if args.steps is None else Budget(steps=args.steps)
        if args.cells:
            cells = [Cell.parse(c) for part in args.cells for c in part.split(",") if c]
        else:
            cells = grid_cells(QUICK_GRID if args.quick else FULL_GRID)
    except UsageError as err:
        print(f"capacity: {err}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed study releases its cell lock
    suffix = "" if args.steps is None else f"_steps{args.steps}"
    if args.collect:
        root = args.out / f"capacity{suffix}"
        every = list(dict.fromkeys([*grid_cells(FULL_GRID), *cells]))
        collect(
            root,
            every,
            budget,
            "embedded",
            root.with_name(root.name + "_cpu.json"),
            root.with_name(root.name + "_cpu.png"),
        )
        return 0
    if args.table:
        collected = args.out / f"capacity{suffix}_cpu.json"
        if not collected.is_file():
            print(f"capacity: {collected}: not found (run the study first)", file=sys.stderr)
            return 2
        print(markdown_table(json.loads(collected.read_text())))
        return 0
    run_study(
        cells,
        budget,
        args.out / f"capacity{suffix}",
        args.out / f"capacity{suffix}_cpu.json",
        args.out / f"capacity{suffix}_cpu.png",
        explicit=bool(args.cells),
        progress=not args.no_progress,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
