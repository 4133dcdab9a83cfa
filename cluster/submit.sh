#!/usr/bin/env bash
# Submit the δ-mem pipeline to a Ray cluster as a Ray job, with the ray CLI only (`deltamem submit` is the same
# in Python: pipeline/submit.py). Run from anywhere; the repository root is uploaded as the job's working_dir.
#
#   cluster/submit.sh                                   # `dvc repro` on $RAY_ADDRESS (default http://127.0.0.1:8265)
#   cluster/submit.sh --no-wait -- dvc repro evaluate   # one stage; return once submitted
#   cluster/submit.sh --gpus 1 -- python -m pipeline.stages.train --variant TSW --no-tracking
#   cluster/submit.sh --dry-run                         # print the ray command instead of running it
#
# Options (before `--`; everything after `--` is the entrypoint, run by `bash -c` in the uploaded copy):
#   --address URL     job server (default: $RAY_ADDRESS, else http://127.0.0.1:8265)
#   --working-dir DIR the directory uploaded (default: the repository root)
#   --no-wait         do not stream the logs; then `ray job logs -f <id>` follows them, `ray job status <id>`
#                     shows the state and `ray job stop <id>` stops the job (all with the same address)
#   --gpus N          GPUs reserved for the entrypoint (--entrypoint-num-gpus)
#   --env KEY=VALUE   environment variable of the job (repeatable), e.g. MLFLOW_TRACKING_URI=http://mlflow:5000
#   --with-git        upload .git too (otherwise DVC runs with core.no_scm in the job's copy)
#   --dry-run         print the command
# Without --no-wait it streams the logs and exits 0 if the job succeeded, 1 if it failed. Ctrl-C stops
# following, not the job. Token auth: export RAY_AUTH_MODE=token (and RAY_AUTH_TOKEN or ~/.ray/auth_token).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

address=${RAY_ADDRESS:-http://127.0.0.1:8265}
working_dir=$repo
wait_flag=()
gpus=()
env_json=""
with_git=0
dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --address) address=$2; shift 2 ;;
    --working-dir) working_dir=$2; shift 2 ;;
    --no-wait) wait_flag=(--no-wait); shift ;;
    --gpus) gpus=(--entrypoint-num-gpus "$2"); shift 2 ;;
    --env)
      key=${2%%=*}; value=${2#*=}
      [ "$key" != "$2" ] || { echo "submit.sh: --env expects KEY=VALUE, got '$2'" >&2; exit 2; }
      env_json+="${env_json:+,}$(printf '"%s":"%s"' "$key" "${value//\"/\\\"}")"; shift 2 ;;
    --with-git) with_git=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) echo "submit.sh: unknown option '$1' (entrypoint after --)" >&2; exit 2 ;;
  esac
done
entrypoint=${*:-dvc repro}

# keep in sync with UPLOAD_EXCLUDES in pipeline/submit.py (tests/pipeline/test_cluster.py checks)
excludes='"/.venv/","/.git/","/mlflow.db","/mlruns/","/.dvc/cache/","/.dvc/tmp/","/models/","/data/*","!/data/raw","/data/raw/*","!/data/raw/README.md","/results/","/reports/","__pycache__/",".pytest_cache/",".ruff_cache/",".hypothesis/"'
if [ "$with_git" = 1 ]; then
  excludes=${excludes//\"\/.git\/\",/}
elif [[ " $entrypoint " == *" dvc "* ]]; then
  entrypoint="dvc config --local core.no_scm true && $entrypoint"   # no .git in the upload
fi
runtime_env="{\"excludes\":[$excludes]"
[ -z "$env_json" ] || runtime_env+=",\"env_vars\":{$env_json}"
runtime_env+="}"

# the ray CLI of the active environment, else of the repository's venv
ray=ray
command -v ray >/dev/null || [ ! -x "$repo/.venv/bin/ray" ] || ray=$repo/.venv/bin/ray
cd "$working_dir"
cmd=("$ray" job submit --address "$address" --working-dir . --runtime-env-json "$runtime_env"
     "${gpus[@]}" "${wait_flag[@]}" -- bash -c "$entrypoint")
if [ "$dry_run" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
