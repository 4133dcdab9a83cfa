"""The evaluator's two error kinds and the one-line description of an input error.

:class:`EvalInputError` (bad params, data or artefacts: the stage exits 2, never retried) is a
:class:`EvalError` (the run could not finish: exit 1).
"""

from __future__ import annotations

import json
from pathlib import Path


class EvalError(RuntimeError):
    """The evaluation could not finish (e.g. a shard failed after all its retries)."""


class EvalInputError(EvalError):
    """A missing or unusable input (backbone, adapter, prepared split)."""


def describe_error(err: BaseException, path: Path | None = None) -> str:
    """One line for an input error; names ``path`` unless the message already does."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, json.JSONDecodeError):
        text = f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}"
    elif isinstance(err, UnicodeDecodeError):
        text = f"not UTF-8 text (byte {err.start}: {err.reason})"
    if path is not None and str(path) not in text:
        text = f"{path}: {text}"
    return text
