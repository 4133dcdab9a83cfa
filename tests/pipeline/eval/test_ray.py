"""The evaluation runner on a real local Ray cluster (127.0.0.1, 2 CPUs, one session for the module)."""

from __future__ import annotations

import re

import pytest

from pipeline.eval.executors import _POOL, shutdown_pool
from pipeline.eval.runner import EvalError, EvalInputError, run_evaluate
from pipeline.eval.shipping import actor_capacity

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
        runs[workers] = run_evaluate(p, eval_root, progress=False)
        assert len(runs[workers].computed) == 6
    assert scores(runs[1].metrics) == scores(runs[2].metrics)
    for unit in ("base/base_no_context", "TSW/deltamem_only", "TSW/deltamem_full_context"):
        a = (tmp_path / "w1" / unit / "synthetic" / "predictions.jsonl").read_text()
        assert a == (tmp_path / "w2" / unit / "synthetic" / "predictions.jsonl").read_text()


def test_failed_shards_are_retried_and_a_rerun_computes_only_the_missing_one(ray_session, eval_root, tmp_path, capsys):
    kw = {"variants": ["TSW"], "conditions": ["base_no_context", "deltamem_only"], "workers": 2}
    flaky = make_params(tmp_path / "flaky", inject_failures={"base/*/shard-0000": 1}, **kw)
    assert len(run_evaluate(flaky, eval_root, progress=False).computed) == 4
    err = capsys.readouterr().err  # every retry is logged: which shard, which worker, why
    assert re.search(
        r"retrying base/base_no_context/synthetic/shard-0000 \(attempt 2 of 2\) after it failed on worker \d: "
        r"RuntimeError: injected failure of base/base_no_context/synthetic/shard-0000 \(attempt 1\)",
        err,
    ), err

    out = tmp_path / "broken"
    broken = make_params(out, inject_failures={"TSW/deltamem_only/*/shard-0000": 9}, **kw)
    with pytest.raises(EvalError, match=r"TSW/deltamem_only/synthetic/shard-0000: RuntimeError: injected failure"):
        run_evaluate(broken, eval_root, progress=False)
    assert "giving up on TSW/deltamem_only/synthetic/shard-0000 after 2 attempts" in capsys.readouterr().err
    done = sorted(out.rglob("shard-*.meta.json"))
    assert len(done) == 3
    mtimes = {f: f.stat().st_mtime_ns for f in out.rglob("shard-*")}
    fixed = run_evaluate(make_params(out, **kw), eval_root, progress=False)
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
        run_evaluate(p, eval_root, progress=False)
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
        s = run_evaluate(p, eval_root, progress=False)
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
            run_evaluate(p, eval_root, progress=False)
    finally:
        for b in blockers:
            ray.kill(b)


# --- no shared filesystem: what the driver sends ------------------------------------------------------------
ALL = ["base_no_context", "rag_bm25", "deltamem_only", "deltamem_full_context", "deltamem_shuffled"]


def _strings(obj, seen=None):
    """Every str (and bytes, decoded leniently) inside nested dicts / lists / tuples / dataclasses."""
    import dataclasses

    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, bytes):
        yield obj.decode("utf-8", "replace")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(obj, list | tuple | set):
        for v in obj:
            yield from _strings(v)
    elif dataclasses.is_dataclass(obj):
        yield from _strings(dataclasses.asdict(obj))
    elif obj is not None and not isinstance(obj, int | float | bool):
        yield repr(obj)  # an object ref: its repr holds no path


def _driver_paths(root):
    return [str(root), str(root.resolve()), str(root / "models" / "backbone"), str(root / "models" / "TSW")]


def test_payloads_carry_no_driver_path_and_rebuild_the_shards_data(eval_root, tmp_path):
    from pipeline.data.schema import read_split
    from pipeline.eval.executors import Shipper
    from pipeline.eval.plan import plan
    from pipeline.eval.worker import materialize

    p = make_params(tmp_path, variants=["TSW", "SSW"], conditions=ALL)
    specs = [s for u in plan(p, eval_root) for s in u.shards]
    assert any(s.donors for s in specs) and any(s.adapter for s in specs)
    puts = []
    shipper = Shipper(put=lambda x: puts.append(x) or x)
    full = {e.example_id: e for e in read_split(eval_root / "data" / "prepared" / "synthetic" / "test.jsonl")}
    for spec in specs:
        sent = shipper.payload(spec)
        assert sent == shipper.payload(spec)  # a retry sends the same blobs
        for text in _strings(sent):
            assert not any(d in text for d in _driver_paths(eval_root)), (spec.key, text[:200])
        spec_dict, data, adapter, extras = sent
        assert not spec_dict["data_path"].startswith("/") and spec_dict["data_path"].endswith("test.jsonl")
        assert (adapter is None) == (spec.adapter is None) and extras is None
        got = {e.example_id: e for e in read_split(materialize(data, tmp_path / spec.key) / spec_dict["data_path"])}
        assert set(spec.example_ids) <= set(got)
        assert all(got[i] == full[i] for i in got)  # the same examples, contexts joined back in
        donors = set(spec.donors.values())
        assert {e.conversation_id for e in got.values()} == {full[i].conversation_id for i in spec.example_ids} | donors
    # each blob put once: one per shard's data, one per adapter (TSW, SSW)
    assert len(puts) == len(specs) + 2
    assert sum(1 for b in puts if "adapter.safetensors" in b) == 2


def test_materialize_refuses_names_that_leave_the_folder(tmp_path):
    from pipeline.eval.worker import materialize

    for bad in ("../x", "/etc/x", "a/../../x", ""):
        with pytest.raises(EvalInputError, match="shipped file"):
            materialize({bad: b"x"}, tmp_path / "t")
    assert materialize({"a/b.json": b"{}"}, tmp_path / "ok") == tmp_path / "ok"
    assert (tmp_path / "ok" / "a" / "b.json").read_bytes() == b"{}"


def test_ray_actors_get_the_backbone_through_the_object_store_and_match_in_process(
    ray_session, eval_root, tmp_path, monkeypatch, capsys
):
    """On a session the stage did not start (as on a cluster) the backbone folder's files are sent; every
    actor call carries refs and relative names only; predictions are the in-process ones byte for byte,
    and each shard's meta names the node that computed it."""
    import json

    import pipeline.eval.executors as ex

    shutdown_pool()
    sent_puts, calls = [], []
    real_put, real_payload = ray.put, ex.Shipper.payload
    monkeypatch.setattr(ray, "put", lambda v, **kw: sent_puts.append(v) or real_put(v, **kw))
    monkeypatch.setattr(ex.Shipper, "payload", lambda self, s: calls.append(real_payload(self, s)) or calls[-1])
    kw = {"variants": ["TSW"], "conditions": ["base_no_context", "deltamem_only", "deltamem_shuffled"]}
    on_ray = run_evaluate(make_params(tmp_path / "ray", workers=2, **kw), eval_root, progress=False)
    assert "sending the backbone folder to the workers through the object store" in capsys.readouterr().err
    assert sum(1 for v in sent_puts if isinstance(v, dict) and "config.json" in v) == 1  # the backbone, once
    assert len(calls) == len(on_ray.computed) == 6
    for text in _strings(calls):
        assert not any(d in text for d in _driver_paths(eval_root)), text[:200]
    assert all(isinstance(c[1], ray.ObjectRef) for c in calls)
    local = run_evaluate(make_params(tmp_path / "local", workers=0, **kw), eval_root, progress=False)
    assert scores(local.metrics) == scores(on_ray.metrics)
    for pred in (tmp_path / "local").rglob("predictions.jsonl"):
        assert pred.read_bytes() == (tmp_path / "ray" / pred.relative_to(tmp_path / "local")).read_bytes()
    node = ray.get_runtime_context().get_node_id()
    metas = [json.loads(m.read_text()) for m in (tmp_path / "ray").rglob("shard-*.meta.json")]
    assert len(metas) == 6 and {m["node_id"] for m in metas} == {node}
    assert not any("node_id" in json.loads(m.read_text()) for m in (tmp_path / "local").rglob("shard-*.meta.json"))
    shutdown_pool()


def test_shared_storage_sends_the_backbone_path(ray_session, eval_root, tmp_path, capsys):
    shutdown_pool()
    p = make_params(tmp_path, variants=["TSW"], conditions=["base_no_context"], workers=1, ray={"shared_storage": True})
    assert len(run_evaluate(p, eval_root, progress=False).computed) == 2
    assert "sending the backbone folder" not in capsys.readouterr().err
    shutdown_pool()


def test_custom_resources_pin_the_actors(ray_session, eval_root, tmp_path):
    nodes = [{"Alive": True, "Resources": {"CPU": 4.0}}, {"Alive": True, "Resources": {"CPU": 4.0, "node2": 3.0}}]
    assert actor_capacity(nodes, 1.0, 0.0) == 8
    assert actor_capacity(nodes, 1.0, 0.0, {"node2": 1.0}) == 3
    assert actor_capacity(nodes, 1.0, 0.0, {"node2": 2.0}) == 1
    p = make_params(
        tmp_path, variants=["TSW"], conditions=["base_no_context"], workers=2, ray={"resources": {"node2": 1}}
    )
    with pytest.raises(EvalInputError, match=r"each asks 1 CPU \+ 1 node2; the cluster has .*0 node2"):
        run_evaluate(p, eval_root, progress=False)
