"""Phase 5a of ``evaluate``: which actors fit the cluster, and what the driver sends a worker (so that no
shared filesystem is needed).

:func:`fit_workers` / :func:`actor_capacity`: how many actors of the per-actor resources (CPUs, GPUs,
custom ``evaluate.ray.resources``) the cluster's nodes hold, before any is created.

:class:`Shipper` turns a :class:`~pipeline.eval.plan.ShardSpec` into the arguments of
:meth:`EvalWorker.run_payload <pipeline.eval.worker.EvalWorker.run_payload>`: the spec with relative names
only, the shard's data (:class:`SplitLines`: the prepared split's lines of its questions and donors, their
contexts, byte for byte), the dataset folder's other files and the adapter's files, each ``{name: bytes}``
(safetensors and JSON: never a pickle) and ``put`` once (``ray.put`` on Ray, the files themselves
in-process). :func:`ships_backbone` decides whether a local backbone folder is sent too (its files, put
once by the Ray executor) or opened by path.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.eval.errors import EvalInputError, describe_error
from pipeline.eval.params import EvalParams
from pipeline.eval.plan import ShardSpec


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (links followed) as ``{relative POSIX name: bytes}``."""
    return {q.relative_to(folder).as_posix(): q.read_bytes() for q in sorted(folder.rglob("*")) if q.is_file()}


class SplitLines:
    """A prepared split's raw lines, indexed for cutting out one shard's data.

    ``examples``: example id → (line, conversation key, context ref); ``contexts``: context id → line.
    The lines are copied byte for byte, so :func:`pipeline.data.schema.read_split` of the cut-out files
    gives exactly the examples of the full split.
    """

    def __init__(self, path: Path) -> None:
        from pipeline.data.schema import contexts_path

        self.path = path
        self.examples: dict[str, tuple[str, str, str | None]] = {}
        self.first_of: dict[str, str] = {}  # conversation key → its first example id (file order)
        for line in _lines(path):
            row = json.loads(line)
            eid = row["example_id"]
            cid = (row.get("metadata") or {}).get("conversation_id")
            conv = eid if cid is None else str(cid)
            ref = row.get("context_ref")
            self.examples[eid] = (line, conv, None if ref is None else str(ref))
            self.first_of.setdefault(conv, eid)
        ctx = contexts_path(path)
        self.contexts_name = ctx.name
        self.contexts = {json.loads(line)["context_id"]: line for line in _lines(ctx)} if ctx.is_file() else {}
        # the dataset folder's other files (e.g. a scorer's id map): :meth:`extra_files`
        self.extras = {
            f.name: f
            for f in sorted(path.parent.iterdir())
            if f.is_file() and not f.name.endswith(".jsonl") and not f.name.startswith(".")
        }

    def shard_files(self, example_ids: list[str], donors: Mapping[str, str], prefix: str) -> dict[str, bytes]:
        """The split cut down to ``example_ids`` and the first example of each donor conversation (what
        the worker reads of a donor: its history), with the contexts they refer to; names under
        ``prefix`` (``<dataset>``), in the original file order."""
        wanted = set(example_ids) | {self.first_of[d] for d in donors.values() if d in self.first_of}
        lines = [rec for eid, rec in self.examples.items() if eid in wanted]
        refs = {ref for _, _, ref in lines if ref is not None}
        files = {f"{prefix}/{self.path.name}": "".join(line + "\n" for line, _, _ in lines).encode()}
        if self.contexts:
            ctx = "".join(line + "\n" for cid, line in self.contexts.items() if cid in refs)
            files[f"{prefix}/{self.contexts_name}"] = ctx.encode()
        return files

    def extra_files(self, prefix: str) -> dict[str, bytes]:
        """The dataset folder's other files (shipped once, shared by the split's shards)."""
        return {f"{prefix}/{name}": f.read_bytes() for name, f in self.extras.items()}


def _lines(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def _same(x: Any) -> Any:
    return x


@dataclass
class Shipper:
    """A shard → what its worker call carries: ``(spec dict, data, adapter, extras)``
    (:meth:`EvalWorker.run_payload <pipeline.eval.worker.EvalWorker.run_payload>`).

    The spec's ``data_path`` becomes ``<dataset>/<split>.jsonl`` (relative to the shipped data) and its
    ``adapter`` the folder's last two names (``TSW/adapter``); data, adapter and extras are ``put(files)`` — ``ray.put``
    for Ray (object refs, each blob put once: adapters by digest, a split's extra files once, a shard's
    data once for all its attempts, dropped by :meth:`release`), the files themselves in-process.
    """

    put: Callable[[Any], Any] = _same
    _splits: dict[str, SplitLines] = field(default_factory=dict)
    _adapters: dict[str | None, Any] = field(default_factory=dict)
    _extras: dict[str, Any] = field(default_factory=dict)
    _data: dict[str, Any] = field(default_factory=dict)

    def payload(self, spec: ShardSpec) -> tuple[dict[str, Any], Any, Any, Any]:
        path = Path(spec.data_path)
        prefix = path.parent.name
        try:
            lines = self._splits.get(spec.data_path)
            if lines is None:
                lines = self._splits[spec.data_path] = SplitLines(path)
            if spec.key not in self._data:
                self._data[spec.key] = self.put(lines.shard_files(spec.example_ids, spec.donors, prefix))
            if spec.data_path not in self._extras:
                extra = lines.extra_files(prefix)
                self._extras[spec.data_path] = self.put(extra) if extra else None
            adapter = None
            if spec.adapter is not None:
                if spec.adapter_digest not in self._adapters:
                    self._adapters[spec.adapter_digest] = self.put(folder_files(Path(spec.adapter)))
                adapter = self._adapters[spec.adapter_digest]
        except (OSError, ValueError, KeyError) as err:  # changed under us since planning: an input problem
            raise EvalInputError(f"{spec.key}: cannot read its inputs to send them ({describe_error(err)})") from None
        sent = spec.to_dict()
        sent["data_path"] = f"{prefix}/{path.name}"
        if spec.adapter is not None:
            sent["adapter"] = "/".join(Path(spec.adapter).parts[-2:])  # e.g. TSW/adapter: a name, not a path
        return sent, self._data[spec.key], adapter, self._extras[spec.data_path]

    def release(self, spec: ShardSpec) -> None:
        """The shard is finished: its data need not stay in the object store."""
        self._data.pop(spec.key, None)


def ships_backbone(p: EvalParams, backbone: str, own_cluster: bool) -> bool:
    """Whether the backbone folder's files are sent to the actors: a local folder, on a cluster the stage
    did not start itself on this machine, unless ``evaluate.ray.shared_storage`` says the path is valid
    on every node (a hub id is resolved on each node)."""
    return Path(backbone).is_dir() and not p.ray.shared_storage and not own_cluster


def folder_size(folder: str) -> str:
    """The size of a folder's files, for the log."""
    size = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
    return f"{size / 2**20:.0f} MiB"


def actor_capacity(
    nodes: Sequence[Mapping[str, Any]],
    num_cpus: float,
    num_gpus: float,
    resources: Mapping[str, float] | None = None,
) -> int:
    """How many actors reserving ``num_cpus`` CPUs, ``num_gpus`` GPUs and the custom ``resources`` fit on
    ``nodes`` (``ray.nodes()`` entries: ``Alive``, ``Resources``); each actor sits on one node."""
    asks = {"CPU": num_cpus, "GPU": num_gpus, **(resources or {})}
    total = 0
    for node in nodes:
        if not node.get("Alive", True):
            continue
        res = node.get("Resources", {})
        fit = min((math.floor(res.get(k, 0.0) / v + 1e-9) for k, v in asks.items() if v > 0), default=math.inf)
        total += 0 if fit == math.inf else int(fit)
    return total


def fit_workers(p: EvalParams, wanted: int, nodes: Sequence[Mapping[str, Any]]) -> int:
    """``wanted`` actors, or as many as the cluster holds (with a warning); EvalInputError if none fits."""
    cpus, gpus, custom = p.ray.actor_num_cpus, p.ray.actor_num_gpus, p.ray.resources
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
    have = {k: sum(r.get(k, 0.0) for r in alive) for k in ("CPU", "GPU", *custom)}
    capacity = actor_capacity(nodes, cpus, gpus, custom)
    ask = f"{cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "") + "".join(f" + {v:g} {k}" for k, v in custom.items())
    has = ", ".join(f"{v:g} {k}" for k, v in have.items()) + f" on {len(nodes)} node(s)"
    if capacity == 0:
        raise EvalInputError(
            f"evaluate.ray: no worker actor fits the Ray cluster (each asks {ask}; the cluster has {has}); "
            "lower evaluate.ray.actor_num_cpus / actor_num_gpus / resources, or set evaluate.workers: 0 (in-process)"
        )
    if capacity < wanted:
        print(
            f"evaluate: warning: {wanted} worker actors of {ask} do not fit the Ray cluster ({has}); "
            f"using {capacity} (set evaluate.workers to silence this)",
            file=sys.stderr,
            flush=True,
        )
        return capacity
    return wanted
