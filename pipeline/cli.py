"""The ``deltamem`` console command: the library's ``chat`` plus the pipeline's verbs.

    deltamem chat --adapter models/TSW                       # deltamem.cli (the library's own entry point)
    deltamem prepare [--params params.yaml] [--out DIR] [--no-tracking]
    deltamem backbone [--params params.yaml]
    deltamem train --variant TSW [--params params.yaml] [--nproc N] [--no-tracking]
    deltamem eval [--params params.yaml] [--workers N] [--no-tracking] [--no-resume]
    deltamem report [--params params.yaml] [--no-tracking]
    deltamem submit [--entrypoint "dvc repro"] [--address URL] [--no-wait] ...

``prepare``/``backbone``/``train``/``eval``/``report`` call the ``main`` of the stage modules
(:mod:`pipeline.stages`), imported by name: ``deltamem train --variant TSW`` and
``python -m pipeline.stages.train --variant TSW`` are the same code, options and exit status;
``deltamem <verb> --help`` shows the stage's options.

The code that runs is the checkout's (issue 11 item 10): run from the root of a checkout other than the one
this command was installed from, the command re-runs itself as ``python -m pipeline.cli`` there, so that
checkout's ``pipeline`` and ``deltamem`` are imported (:func:`foreign_checkout`). Run it from the repository
root (the stages' default ``--params params.yaml`` is relative to the working folder).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

_REEXEC_ENV = "DELTAMEM_CLI_CHECKOUT"  # set on the re-run: never re-run twice

# verb -> (stage module under pipeline.stages, one-line help)
STAGE_VERBS: dict[str, tuple[str, str]] = {
    "prepare": ("prepare", "read and normalize the datasets → data/prepared/ (DVC stage prepare)"),
    "backbone": ("backbone", "save the configured backbone as a Hugging Face folder → models/backbone/"),
    "train": ("train", "δ-mem SFT of one variant → models/<variant>/ (torchrun + DeepSpeed with --nproc > 1)"),
    "eval": ("evaluate", "every condition × variant × task → results/eval/ (DVC stage evaluate)"),
    "report": ("report", "tables and figures from the results (DVC stage report)"),
}


def load_stage(name: str) -> ModuleType:
    """The stage module ``pipeline.stages.<name>`` (an ordinary import: this package's own)."""
    return importlib.import_module(f"pipeline.stages.{name}")


def stage_main(name: str) -> Callable[[list[str] | None], int]:
    """The ``main(argv) -> int`` of :mod:`pipeline.stages.<name>`."""
    return load_stage(name).main


def foreign_checkout(cwd: Path | None = None) -> Path | None:
    """``cwd`` when it is the root of a deltamem checkout other than the one imported here, else None.

    A checkout's root holds ``pipeline/cli.py`` and ``pipeline/stages/__init__.py``; the same files as
    ours (also through a symlink) are not foreign.
    """
    cwd = Path.cwd() if cwd is None else cwd
    cli, stages = cwd / "pipeline" / "cli.py", cwd / "pipeline" / "stages" / "__init__.py"
    if not (cli.is_file() and stages.is_file()):
        return None
    try:
        same = cli.samefile(Path(__file__))
    except OSError:
        same = False
    return None if same else cwd


def _rerun_in(checkout: Path, argv: list[str]) -> int:
    """Run ``python -m pipeline.cli ARGV`` in ``checkout`` (``-m`` puts the working folder first on sys.path)."""
    import subprocess

    env = {**os.environ, _REEXEC_ENV: str(checkout)}
    return subprocess.call([sys.executable, "-m", "pipeline.cli", *argv], cwd=checkout, env=env)


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
    """``deltamem <verb> ARGS``: the stage module's ``main(ARGS)``."""
    script, _ = STAGE_VERBS[verb]
    main = stage_main(script)
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
    checkout = None if os.environ.get(_REEXEC_ENV) else foreign_checkout()
    if checkout is not None:
        return _rerun_in(checkout, argv)
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
