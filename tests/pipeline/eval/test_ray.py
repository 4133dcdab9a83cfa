"""The evaluation runner on a real local Ray cluster (127.0.0.1, 2 CPUs, one session for the module)."""

from __future__ import annotations

import re

import pytest

from pipeline.eval.executors import _POOL, actor_capacity, shutdown_pool
from pipeline.eval.runner import EvalError, EvalInputError, run_evaluate

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
    from pipeline.ray_local import start_local_ray

    if ray.is_initialized():
        ray.shutdown()
    local = start_local_ray(num_cpus=2, object_store_mb=80)
    yield
    shutdown_pool()
    local.shutdown()


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


def test_failed_shards_are_retried_and_a_rerun_computes_only_the_missing_one(ray_session, eval_root, tmp_path, capsys):
    kw = {"variants": ["TSW"], "conditions": ["base_no_context", "deltamem_only"], "workers": 2}
    flaky = make_params(tmp_path / "flaky", inject_failures={"base/*/shard-0000": 1}, **kw)
    assert len(run_evaluate(flaky, eval_root, log_mlflow=False, progress=False).computed) == 4
    err = capsys.readouterr().err  # every retry is logged: which shard, which worker, why
    assert re.search(
        r"retrying base/base_no_context/synthetic/shard-0000 \(attempt 2 of 2\) after it failed on worker \d: "
        r"RuntimeError: injected failure of base/base_no_context/synthetic/shard-0000 \(attempt 1\)",
        err,
    ), err

    out = tmp_path / "broken"
    broken = make_params(out, inject_failures={"TSW/deltamem_only/*/shard-0000": 9}, **kw)
    with pytest.raises(EvalError, match=r"TSW/deltamem_only/synthetic/shard-0000: RuntimeError: injected failure"):
        run_evaluate(broken, eval_root, log_mlflow=False, progress=False)
    assert "giving up on TSW/deltamem_only/synthetic/shard-0000 after 2 attempts" in capsys.readouterr().err
    done = sorted(out.rglob("shard-*.meta.json"))
    assert len(done) == 3
    mtimes = {f: f.stat().st_mtime_ns for f in out.rglob("shard-*")}
    fixed = run_evaluate(make_params(out, **kw), eval_root, log_mlflow=False, progress=False)
    assert fixed.computed == ["TSW/deltamem_only/synthetic/shard-0000"] and len(fixed.reused) == 3
    assert all(f.stat().st_mtime_ns == t for f, t in mtimes.items())


def test_actor_capacity_counts_whole_actors_per_node():
    nodes = [
        {"Alive": True, "Resources": {"CPU": 3.0, "GPU": 1.0}},
        {"Alive": True, "Resources": {"CPU": 8.0}},
        {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}},
    ]
    assert actor_capacity(nodes, 1.0, 0.0) == 11
    assert actor_capacity(nodes, 2.0, 0.0) == 1 + 4
    assert actor_capacity(nodes, 1.0, 1.0) == 1  # one GPU in the live nodes
    assert actor_capacity(nodes, 1.0, 0.5) == 2
    assert actor_capacity(nodes, 4.0, 1.0) == 0


def test_actors_that_cannot_fit_stop_the_stage_at_once(ray_session, eval_root, tmp_path):
    p = make_params(tmp_path, variants=["TSW"], conditions=["base_no_context"], workers=2, ray={"actor_num_gpus": 1})
    with pytest.raises(EvalInputError, match=r"no worker actor fits the Ray cluster \(each asks 1 CPU \+ 1 GPU; "):
        run_evaluate(p, eval_root, log_mlflow=False, progress=False)
    assert not list(tmp_path.rglob("shard-*"))


@ray.remote(num_cpus=1)
class _Blocker:
    def ping(self) -> bool:
        return True


@pytest.mark.timeout(180)
def test_only_started_actors_get_shards(ray_session, eval_root, tmp_path, capsys):
    """Another job holds one of the two CPUs: of 2 requested actors one cannot start. It gets no shard, the
    started one computes them all (before: its shard waited forever on the pending actor)."""
    shutdown_pool()
    blocker = _Blocker.remote()
    ray.get(blocker.ping.remote())
    try:
        p = make_params(tmp_path, variants=["TSW"], conditions=["base_no_context", "deltamem_only"], workers=2)
        s = run_evaluate(p, eval_root, log_mlflow=False, progress=False)
        assert len(s.computed) == 4
        assert len(_POOL["actors"]) == 1  # the pending actor was killed, not kept waiting in the pool
        ray.get(blocker.ping.remote())
    finally:
        ray.kill(blocker)


@pytest.mark.timeout(120)
def test_no_actor_starting_is_an_error_after_the_start_timeout(ray_session, eval_root, tmp_path):
    shutdown_pool()
    blockers = [_Blocker.remote() for _ in range(2)]
    ray.get([b.ping.remote() for b in blockers])
    try:
        p = make_params(
            tmp_path, variants=["TSW"], conditions=["base_no_context"], workers=1, ray={"actor_start_timeout_s": 3}
        )
        with pytest.raises(EvalInputError, match=r"no worker actor started within 3s \(worker 0 pending"):
            run_evaluate(p, eval_root, log_mlflow=False, progress=False)
    finally:
        for b in blockers:
            ray.kill(b)
