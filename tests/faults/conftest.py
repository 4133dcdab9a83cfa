"""The fault suite shares the evaluation fixtures (a tiny backbone, adapters and prepared splits)."""

from tests.pipeline.conftest import smol_tokenizer  # noqa: F401
from tests.pipeline.eval.conftest import eval_root  # noqa: F401
from tests.pipeline.report.test_report import results_tree  # noqa: F401
