"""Time the README's first command on a fresh clone: set-up, then `dvc repro` of the embedded default.

    python bench/repro_time.py [--repo .] [--out bench/results/repro_cpu.json] [--keep]

Clones the repository's HEAD into a temporary folder, runs `bash scripts/setup.sh` (timed), then
`dvc repro` from the clone's venv (timed; each stage's wall time from the moments DVC announces it), and
records the result with the machine's core count and load. The target for the embedded default is
≤ 15 minutes for set-up + `dvc repro` on 2 CPU cores; take the figure on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_streaming(cmd: list[str], cwd: Path, env: dict[str, str], log) -> tuple[int, dict[str, float]]:
    """Run ``cmd``; return its exit status and the wall seconds of each announced DVC stage."""
    stages: dict[str, float] = {}
    current, started = None, time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        log.write(line)
        m = re.search(r"Running stage '([^']+)'", line)
        if m:
            now = time.perf_counter()
            if current:
                stages[current] = now - started
            current, started = m.group(1), now
    code = proc.wait()
    if current:
        stages[current] = time.perf_counter() - started
    return code, stages


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "repro_cpu.json"))
    ap.add_argument("--keep", action="store_true", help="keep the temporary clone")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="deltamem-repro-"))
    clone = tmp / "deltamem"
    load_before = os.getloadavg()
    try:
        subprocess.run(["git", "clone", "-q", args.repo, str(clone)], check=True)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "MLFLOW_", "DELTAMEM_"))}
        log_path = tmp / "repro.log"
        with log_path.open("w") as log:
            t0 = time.perf_counter()
            code, _ = run_streaming(["bash", "scripts/setup.sh"], clone, env, log)
            setup_s = time.perf_counter() - t0
            if code:
                print(f"set-up failed ({code}); log: {log_path}", file=sys.stderr)
                return 1
            venv_bin = str(clone / ".venv" / "bin")
            env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
            t1 = time.perf_counter()
            code, stages = run_streaming([f"{venv_bin}/dvc", "repro"], clone, env, log)
            repro_s = time.perf_counter() - t1
        if code:
            print(f"dvc repro failed ({code}); log: {log_path}", file=sys.stderr)
            return 1
        result = {
            "commit": commit,
            "cpus": os.cpu_count(),
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()],
            "setup_s": round(setup_s, 1),
            "repro_s": round(repro_s, 1),
            "total_min": round((setup_s + repro_s) / 60, 2),
            "stages_s": {k: round(v, 1) for k, v in stages.items()},
            "summary": json.loads((clone / "reports" / "summary.json").read_text()),
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "summary"}, indent=2))
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
