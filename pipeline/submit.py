"""Submit the pipeline (or one stage, or any command) to a Ray cluster as a Ray job.

    deltamem submit                                   # `dvc repro` on $RAY_ADDRESS (default http://127.0.0.1:8265)
    deltamem submit --entrypoint "dvc repro evaluate" --no-wait
    deltamem submit --entrypoint "python -m pipeline.stages.evaluate --no-tracking" --gpus 1
    deltamem submit --dry-run                         # print the equivalent `ray job submit` command line

The repository (``--working-dir``, default ``.``) is zipped and uploaded as the job's ``working_dir``, minus
:data:`UPLOAD_EXCLUDES` (the venv, git history, MLflow store, DVC cache, data and model folders; Ray also skips
what ``.gitignore``/``.rayignore`` list). On the cluster the entrypoint runs in a shell, in the unpacked copy,
with that copy first on ``PYTHONPATH`` and the ``PATH`` of the Ray node (start the head from the project's
venv, or use an image with the project's dependencies installed: see ``cluster/README.md``).

Without ``.git`` in the upload DVC refuses to run ("not a git repository"), so an entrypoint that calls ``dvc``
is prefixed with ``dvc config --local core.no_scm true &&`` (``.dvc/config.local`` of the job's copy only);
``--with-git`` uploads ``.git`` instead. The job's copy is temporary: persist results with ``dvc push`` to a
DVC remote and an MLflow server (``--env MLFLOW_TRACKING_URI=...``), e.g.
``--entrypoint "dvc pull --allow-missing && dvc repro && dvc push"``.

Authentication: the client follows ``RAY_AUTH_MODE`` / ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` (token
mode sends ``~/.ray/auth_token`` or the given token); ``--header`` adds HTTP headers (e.g. a proxy's bearer token).

``cluster/submit.sh`` does the same with the ``ray`` CLI alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DEFAULT_ENTRYPOINT = "dvc repro"
# gitignore syntax, relative to the working dir; anchored ("/data/") so pipeline/data/ is kept
UPLOAD_EXCLUDES: tuple[str, ...] = (
    "/.venv/",
    "/.git/",
    "/mlflow.db",
    "/mlruns/",
    "/.dvc/cache/",
    "/.dvc/tmp/",
    "/models/",
    "/data/*",  # data/raw/README.md goes: the folder is a dependency of `prepare` (dvc.yaml); the data stays
    "!/data/raw",
    "/data/raw/*",
    "!/data/raw/README.md",
    "/results/",
    "/reports/",
    "__pycache__/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".hypothesis/",
)
NO_SCM_PREFIX = "dvc config --local core.no_scm true && "
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def address_from_env() -> str:
    """``$RAY_API_SERVER_ADDRESS``, else ``$RAY_ADDRESS`` (as ``ray job submit``), else :data:`DEFAULT_ADDRESS`."""
    return os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def job_entrypoint(entrypoint: str, with_git: bool = False) -> str:
    """The shell command the job runs: ``entrypoint``, marked no-SCM for DVC when ``.git`` is not uploaded."""
    if not entrypoint.strip():
        raise ValueError("empty entrypoint")
    try:
        words = shlex.split(entrypoint)
    except ValueError:
        words = entrypoint.split()
    if with_git or "dvc" not in words or entrypoint.startswith(NO_SCM_PREFIX):
        return entrypoint
    return NO_SCM_PREFIX + entrypoint


def runtime_env(
    working_dir: str | os.PathLike = ".",
    env_vars: Mapping[str, str] | None = None,
    excludes: Sequence[str] = UPLOAD_EXCLUDES,
    with_git: bool = False,
) -> dict[str, Any]:
    """The job's runtime_env: ``working_dir`` (uploaded), ``excludes`` and ``env_vars``."""
    ex = [e for e in excludes if not (with_git and e.strip("/") == ".git")]
    env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": ex}
    if env_vars:
        env["env_vars"] = dict(env_vars)
    return env


@dataclass
class JobResult:
    submission_id: str
    status: str  # a ray.job_submission.JobStatus value, or "SUBMITTED" with wait=False
    logs: str = ""
    message: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        return self.status == "SUCCEEDED"


def ray_cli_command(
    entrypoint: str = DEFAULT_ENTRYPOINT,
    address: str | None = None,
    env: Mapping[str, Any] | None = None,
    wait: bool = True,
    submission_id: str | None = None,
    gpus: float | None = None,
    cpus: float | None = None,
    with_git: bool = False,
) -> list[str]:
    """The ``ray job submit`` argv equivalent to :func:`submit` (the CLI quotes each word: run via ``bash -c``)."""
    env = dict(env or runtime_env(with_git=with_git))
    working_dir = env.pop("working_dir", ".")
    cmd = ["ray", "job", "submit", "--address", address or address_from_env(), "--working-dir", str(working_dir)]
    cmd += ["--runtime-env-json", json.dumps(env, separators=(",", ":"))]
    if submission_id:
        cmd += ["--submission-id", submission_id]
    if gpus:
        cmd += ["--entrypoint-num-gpus", str(gpus)]
    if cpus:
        cmd += ["--entrypoint-num-cpus", str(cpus)]
    if not wait:
        cmd.append("--no-wait")
    return [*cmd, "--", "bash", "-c", job_entrypoint(entrypoint, with_git)]


def submit(
    entrypoint: str = DEFAULT_ENTRYPOINT,
    *,
    address: str | None = None,
    working_dir: str | os.PathLike = ".",
    env_vars: Mapping[str, str] | None = None,
    excludes: Sequence[str] = UPLOAD_EXCLUDES,
    with_git: bool = False,
    submission_id: str | None = None,
    gpus: float | None = None,
    cpus: float | None = None,
    headers: Mapping[str, str] | None = None,
    wait: bool = True,
    timeout_s: float | None = None,
    poll_s: float = 1.0,
    on_log: Callable[[str], None] | None = None,
) -> JobResult:
    """Submit ``entrypoint`` as a Ray job with the repository as its working dir; optionally follow it.

    ``wait``: poll until the job ends, passing new log text to ``on_log`` (e.g. ``sys.stdout.write``); a
    ``timeout_s`` that passes first raises :class:`TimeoutError` (the job keeps running: ``ray job stop ID``).
    """
    from ray.job_submission import JobSubmissionClient

    wd = Path(working_dir)
    if not wd.is_dir():
        raise FileNotFoundError(f"working dir not found: {wd}")
    client = JobSubmissionClient(address or address_from_env(), headers=dict(headers) if headers else None)
    kwargs: dict[str, Any] = {}
    if gpus:
        kwargs["entrypoint_num_gpus"] = gpus
    if cpus:
        kwargs["entrypoint_num_cpus"] = cpus
    job_id = client.submit_job(
        entrypoint=job_entrypoint(entrypoint, with_git),
        runtime_env=runtime_env(wd.resolve(), env_vars, excludes, with_git),
        submission_id=submission_id,
        metadata={"project": "deltamem", "entrypoint": entrypoint},
        **kwargs,
    )
    if not wait:
        return JobResult(job_id, "SUBMITTED")
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    shown = 0
    while True:
        status = str(client.get_job_status(job_id).value)
        logs = client.get_job_logs(job_id)
        if on_log is not None and len(logs) > shown:
            on_log(logs[shown:])
        shown = len(logs)
        if status in TERMINAL:
            info = client.get_job_info(job_id)
            return JobResult(job_id, status, logs, info.message or "", _info_dict(info))
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout_s:.0f}s (stop it: ray job stop {job_id})")
        time.sleep(poll_s)


def _info_dict(info: Any) -> dict[str, Any]:
    keys = ("status", "message", "error_type", "start_time", "end_time", "driver_exit_code", "entrypoint")
    return {k: (str(getattr(info, k).value) if k == "status" else getattr(info, k, None)) for k in keys}


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument(
        "--entrypoint",
        default=DEFAULT_ENTRYPOINT,
        help=f"shell command run in the uploaded repository (default: {DEFAULT_ENTRYPOINT!r}; e.g. 'dvc repro "
        "evaluate' or 'python -m pipeline.stages.evaluate --no-tracking')",
    )
    ap.add_argument(
        "--address",
        default=None,
        help=f"Ray dashboard / job server URL (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, {DEFAULT_ADDRESS})",
    )
    ap.add_argument("--working-dir", default=".", help="directory uploaded as the job's working_dir (default: .)")
    ap.add_argument(
        "--env",
        action="append",
        default=[],
        type=_key_value,
        metavar="KEY=VALUE",
        help="environment variable for the job (repeatable), e.g. MLFLOW_TRACKING_URI=http://mlflow:5000",
    )
    ap.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="also leave this gitignore-style pattern out of the upload (repeatable; "
        f"always excluded: {' '.join(UPLOAD_EXCLUDES)})",
    )
    ap.add_argument("--with-git", action="store_true", help="upload .git too (DVC then runs with git, not no_scm)")
    ap.add_argument("--gpus", type=float, default=None, help="GPUs reserved for the entrypoint (e.g. 1 for training)")
    ap.add_argument("--cpus", type=float, default=None, help="CPUs reserved for the entrypoint")
    ap.add_argument("--submission-id", default=None, help="job id to use (default: generated by Ray)")
    ap.add_argument(
        "--header",
        action="append",
        default=[],
        type=_key_value,
        metavar="NAME=VALUE",
        help="HTTP header for the job server (repeatable), e.g. Authorization='Bearer ...' behind a proxy",
    )
    ap.add_argument(
        "--no-wait",
        action="store_true",
        help="return once submitted; follow with `ray job logs -f ID`, stop with `ray job stop ID`",
    )
    ap.add_argument(
        "--timeout", type=float, default=None, help="stop waiting after this many seconds (job keeps running)"
    )
    ap.add_argument("--dry-run", action="store_true", help="print the equivalent `ray job submit` command and exit")
    return ap


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``submit`` command line; exit status 0 when the job succeeded (or was submitted)."""
    env_vars = dict(args.env)
    excludes = (*UPLOAD_EXCLUDES, *args.exclude)
    if args.dry_run:
        env = runtime_env(args.working_dir, env_vars, excludes, args.with_git)
        argv = ray_cli_command(
            args.entrypoint,
            args.address,
            env,
            wait=not args.no_wait,
            submission_id=args.submission_id,
            gpus=args.gpus,
            cpus=args.cpus,
            with_git=args.with_git,
        )
        print(shlex.join(argv))
        return 0
    try:
        result = submit(
            args.entrypoint,
            address=args.address,
            working_dir=args.working_dir,
            env_vars=env_vars,
            excludes=excludes,
            with_git=args.with_git,
            submission_id=args.submission_id,
            gpus=args.gpus,
            cpus=args.cpus,
            headers=dict(args.header),
            wait=not args.no_wait,
            timeout_s=args.timeout,
            on_log=lambda text: (sys.stdout.write(text), sys.stdout.flush()),
        )
    except (FileNotFoundError, ValueError, TimeoutError) as err:
        print(f"submit: error: {err}", file=sys.stderr)
        return 2
    except ConnectionError as err:
        print(f"submit: error: cannot reach the Ray job server: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nsubmit: stopped following; the job keeps running (ray job list / ray job stop ID)", file=sys.stderr)
        return 130
    jid = result.submission_id
    if args.no_wait:
        print(
            f"submit: job {jid} submitted. Follow: ray job logs -f {jid}   Status: ray job status {jid}   "
            f"Stop: ray job stop {jid}"
        )
        return 0
    print(f"submit: job {jid} {result.status}" + (f": {result.message}" if not result.succeeded else ""))
    return 0 if result.succeeded else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="deltamem submit", description=__doc__.splitlines()[0])
    return run(add_arguments(ap).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
