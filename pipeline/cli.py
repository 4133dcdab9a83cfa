"""The ``deltamem`` console command: the library's ``chat`` plus the pipeline's verbs.

    deltamem chat --adapter models/TSW                       # deltamem.cli (the library's own entry point)
    deltamem prepare [--params params.yaml] [--out DIR] [--no-tracking]
    deltamem backbone [--params params.yaml]
    deltamem train --variant TSW [--params params.yaml] [--nproc N] [--no-tracking]
    deltamem eval [--params params.yaml] [--workers N] [--no-tracking] [--no-resume]
    deltamem report [--params params.yaml] [--no-tracking]
    deltamem submit [--entrypoint "dvc repro"] [--address URL] [--no-wait] ...

``prepare``/``backbone``/``train``/``eval``/``report`` run the ``main`` of the DVC stage scripts
(``stages/<name>.py``), so ``deltamem train --variant TSW`` and ``python stages/train.py --variant TSW`` are the
same code, options and exit status; ``deltamem <verb> --help`` shows the stage's options. The stage scripts are
loaded from the repository that holds this package (an editable install: ``pip install -e .``), so run the
command from the repository root (the stages' default ``--params params.yaml`` is relative to the working dir).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGES_DIR = REPO_ROOT / "stages"

# verb -> (stage script, one-line help)
STAGE_VERBS: dict[str, tuple[str, str]] = {
    "prepare": ("prepare", "read and normalize the datasets → data/prepared/ (DVC stage prepare)"),
    "backbone": ("backbone", "save the configured backbone as a Hugging Face folder → models/backbone/"),
    "train": ("train", "δ-mem SFT of one variant → models/<variant>/ (torchrun + DeepSpeed with --nproc > 1)"),
    "eval": ("evaluate", "every condition × variant × task → results/eval/ (DVC stage evaluate)"),
    "report": ("report", "tables and figures from the results (DVC stage report)"),
}


def load_stage(name: str) -> ModuleType:
    """Import ``stages/<name>.py`` of this repository (once) as module ``stages.<name>``."""
    mod_name = f"stages.{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    path = STAGES_DIR / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(
            f"stage script {path} not found: `deltamem {name}` needs the repository checkout (pip install -e .)"
        )
    spec = importlib.util.spec_from_file_location(mod_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[mod_name]
        raise
    return module


def stage_main(name: str) -> Callable[[list[str] | None], int]:
    """The ``main(argv) -> int`` of ``stages/<name>.py``."""
    return load_stage(name).main


@contextlib.contextmanager
def _prog(prog: str) -> Iterator[None]:
    """Make a delegated parser call itself ``prog`` (argparse's default prog is ``basename(sys.argv[0])``)."""
    saved = sys.argv[0] if sys.argv else ""
    if sys.argv:
        sys.argv[0] = prog
    else:
        sys.argv.append(prog)
    try:
        yield
    finally:
        sys.argv[0] = saved


def run_stage(verb: str, argv: list[str]) -> int:
    """``deltamem <verb> ARGS``: the stage script's ``main(ARGS)``."""
    script, _ = STAGE_VERBS[verb]
    try:
        main = stage_main(script)
    except FileNotFoundError as err:
        print(f"deltamem {verb}: error: {err}", file=sys.stderr)
        return 2
    with _prog(f"deltamem {verb}"):
        return int(main(argv) or 0)


def run_chat(argv: list[str]) -> int:
    from deltamem.cli import main as chat_main

    return int(chat_main(["chat", *argv]) or 0)


def run_submit(argv: list[str]) -> int:
    from pipeline.submit import main as submit_main

    return submit_main(argv)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: lists the verbs; each verb parses its own options (``deltamem VERB --help``)."""
    ap = argparse.ArgumentParser(
        prog="deltamem",
        description="δ-mem: online memory for frozen LLMs — chat with a memory, and run the experiment pipeline",
        epilog="`deltamem VERB --help` lists the options of a verb. `dvc repro` runs the whole pipeline locally; "
        "`deltamem submit` runs it on a Ray cluster (cluster/README.md).",
    )
    sub = ap.add_subparsers(dest="command", metavar="VERB", required=True)
    sub.add_parser("chat", help="chat with a memory: write turns into the state, ask from it", add_help=False)
    for verb, (_, help_text) in STAGE_VERBS.items():
        sub.add_parser(verb, help=help_text, add_help=False)
    sub.add_parser("submit", help="run the pipeline (or a stage/command) as a Ray job on $RAY_ADDRESS", add_help=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        verb, rest = argv[0], argv[1:]
        if verb == "chat":
            return run_chat(rest)
        if verb == "submit":
            return run_submit(rest)
        if verb in STAGE_VERBS:
            return run_stage(verb, rest)
    build_parser().parse_args(argv)  # --help, or an unknown verb: argparse prints and exits
    return 2


if __name__ == "__main__":
    sys.exit(main())
