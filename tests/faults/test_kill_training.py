"""Kill the train stage (SIGKILL, a real process) at a random step, maybe in the middle of writing a
checkpoint; rerunning it resumes from the last complete checkpoint and ends with a bit-identical adapter
and the same loss history as an uninterrupted run.

The kill point is drawn afresh each run (``DELTAMEM_KILL_SEED`` fixes it); the failure message names it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.pipeline.train.test_distributed import make_workspace

REPO = Path(__file__).resolve().parents[2]
STEPS = 6
OPTIM = {"steps": STEPS, "batch_size": 2, "grad_accum": 1, "lr": 5e-3, "warmup_ratio": 0.2, "seed": 0}


def workspace(root: Path, tokenizer) -> Path:
    make_workspace(root, tokenizer)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(nproc=1, launcher="local")
    params["train"]["optim"] = {**OPTIM, "checkpoint_every": 1, "keep_checkpoints": 1}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
CMD = [
    sys.executable,
    "-m",
    "pipeline.stages.train",
    "--params",
    "params.yaml",
    "--variant",
    "TSW",
    "--no-tracking",
]


def stage(root: Path) -> str:
    """The train stage as a user runs it (its own process, the same threads every time); returns its stderr."""
    r = subprocess.run(CMD, cwd=root, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stderr


@pytest.mark.slow
def test_training_killed_at_a_random_step_resumes_to_the_identical_adapter(smol_tokenizer, tmp_path):
    seed = int(os.environ.get("DELTAMEM_KILL_SEED", time.time_ns() % 2**31))
    rng = random.Random(seed)
    kill_after, fraction = rng.randint(2, STEPS - 2), rng.uniform(0.0, 0.9)
    where = f"killed {fraction:.2f} of a step after checkpoint {kill_after} (DELTAMEM_KILL_SEED={seed})"

    full = workspace(tmp_path / "full", smol_tokenizer)
    stage(full)
    cut = tmp_path / "cut"
    cut.mkdir()
    for name in ("backbone", "data", "params.yaml"):
        (shutil.copytree if (full / name).is_dir() else shutil.copy)(full / name, cut / name)

    ckpts = cut / "models" / "TSW" / "checkpoints"
    proc = subprocess.Popen(CMD, cwd=cut, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, seen = time.monotonic() + 300, {}
    try:
        while kill_after not in seen:  # when each checkpoint appears: the step time, measured in this run
            for step in (kill_after - 1, kill_after):
                if step not in seen and (ckpts / f"step-{step:06d}").is_dir():
                    seen[step] = time.monotonic()
            assert proc.poll() is None, f"the stage ended before it could be {where}"
            assert time.monotonic() < deadline, where
            time.sleep(0.005)
        step_s = seen[kill_after] - seen.get(kill_after - 1, seen[kill_after])
        time.sleep(fraction * step_s)  # somewhere in the next step, maybe while its checkpoint is written
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (cut / "models" / "TSW" / "adapter").exists(), f"the run finished before it was {where}"
    left = sorted(p.name for p in ckpts.iterdir())
    complete = [n for n in left if n.startswith("step-")]
    assert complete, where

    err = stage(cut)
    resumed_at = int(complete[-1].removeprefix("step-"))
    assert f"at step {resumed_at} of {STEPS}" in err, (where, err)
    a = load_file(str(full / "models" / "TSW" / "adapter" / "adapter.safetensors"))
    b = load_file(str(cut / "models" / "TSW" / "adapter" / "adapter.safetensors"))
    assert sorted(a) == sorted(b), where
    for k in a:
        assert torch.equal(a[k], b[k]), (k, where)
    history = [json.loads((r / "models" / "TSW" / "training_summary.json").read_text())["history"] for r in (full, cut)]
    assert [r["loss"] for r in history[0]] == [r["loss"] for r in history[1]], where
    assert not ckpts.exists(), where  # checkpoints (and any half-written .tmp-step-*) removed with the adapter
