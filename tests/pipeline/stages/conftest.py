"""Fixtures of the stage tests: the tiny evaluation root of tests/pipeline/eval (backbone, adapters, split)."""

from tests.pipeline.eval.conftest import eval_root  # noqa: F401
