"""The evaluation runner on a real local Ray cluster (127.0.0.1, 2 CPUs, one session for the module)."""

from __future__ import annotations

import pytest

from pipeline.eval.runner import EvalError, run_evaluate

from .conftest import make_params

ray = pytest.importorskip("ray")

CONDITIONS = ["base_no_context", "deltamem_only", "deltamem_full_context"]


def scores(metrics: dict) -> dict:
    """The metrics without the cost figures (timings differ between runs)."""
    return {
        u: {t: {k: v for k, v in m.items() if not k.startswith("cost/")} for t, m in ts.items()}
        for u, ts in metrics.items()
    }


@pytest.fixture(scope="module")
def ray_session():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        num_cpus=2,
        object_store_memory=80 * 2**20,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level="warning",
    )
    yield
    from pipeline.eval.ray_runner import shutdown_pool

    shutdown_pool()
    ray.shutdown()


def test_one_and_two_workers_give_the_same_metrics(ray_session, eval_root, tmp_path):
    runs = {}
    for workers in (1, 2):
        p = make_params(tmp_path / f"w{workers}", variants=["TSW"], conditions=CONDITIONS, workers=workers)
        runs[workers] = run_evaluate(p, eval_root, log_mlflow=False, progress=False)
        assert len(runs[workers].computed) == 6
    assert scores(runs[1].metrics) == scores(runs[2].metrics)
    for unit in ("base/base_no_context", "TSW/deltamem_only", "TSW/deltamem_full_context"):
        a = (tmp_path / "w1" / unit / "synthetic" / "predictions.jsonl").read_text()
        assert a == (tmp_path / "w2" / unit / "synthetic" / "predictions.jsonl").read_text()


def test_failed_shards_are_retried_and_a_rerun_computes_only_the_missing_one(ray_session, eval_root, tmp_path):
    kw = {"variants": ["TSW"], "conditions": ["base_no_context", "deltamem_only"], "workers": 2}
    flaky = make_params(tmp_path / "flaky", inject_failures={"base/*/shard-0000": 1}, **kw)
    assert len(run_evaluate(flaky, eval_root, log_mlflow=False, progress=False).computed) == 4

    out = tmp_path / "broken"
    broken = make_params(out, inject_failures={"TSW/deltamem_only/*/shard-0000": 9}, **kw)
    with pytest.raises(EvalError, match=r"TSW/deltamem_only/synthetic/shard-0000: RuntimeError: injected failure"):
        run_evaluate(broken, eval_root, log_mlflow=False, progress=False)
    done = sorted(out.rglob("shard-*.meta.json"))
    assert len(done) == 3
    mtimes = {f: f.stat().st_mtime_ns for f in out.rglob("shard-*")}
    fixed = run_evaluate(make_params(out, **kw), eval_root, log_mlflow=False, progress=False)
    assert fixed.computed == ["TSW/deltamem_only/synthetic/shard-0000"] and len(fixed.reused) == 3
    assert all(f.stat().st_mtime_ns == t for f, t in mtimes.items())
