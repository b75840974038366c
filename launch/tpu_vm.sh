#!/usr/bin/env bash
# Run a jaxretina job on every host of a Cloud TPU VM pod slice.
#
#   launch/tpu_vm.sh --tpu NAME --zone ZONE [--project P] [--dry-run] -- \
#       --config configs/keepfit.py:paper --workdir gs://bucket/run --config.data.data_dir=gs://bucket/tfds
#
# Every worker runs the same `python -m jaxretina.main ...`; on TPU VMs jax.distributed discovers the
# pod from the environment, so no coordinator address is needed. --dry-run (anywhere on the line)
# prints the command and runs nothing.
set -euo pipefail
tpu="" zone="" project="" dry=0 repo_dir="${JAXRETINA_REMOTE_DIR:-~/jaxretina}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --repo-dir) repo_dir="$2"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    --) shift; break ;;
    *) echo "unknown option $1 (put job arguments after --)" >&2; exit 2 ;;
  esac
done
# --dry-run after -- would otherwise reach the job and this script would launch for real.
job_args=()
for arg in "$@"; do
  if [[ "$arg" == "--dry-run" ]]; then dry=1; else job_args+=("$arg"); fi
done
set -- "${job_args[@]+"${job_args[@]}"}"
[[ -n "$tpu" && -n "$zone" ]] || { echo "usage: $0 --tpu NAME --zone ZONE [--project P] [--dry-run] -- JOB ARGS" >&2; exit 2; }
[[ $# -gt 0 ]] || { echo "no job arguments after --" >&2; exit 2; }
job="cd $repo_dir && python3 -m jaxretina.main $(printf '%q ' "$@")"
cmd=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$job")
[[ -n "$project" ]] && cmd+=(--project "$project")
if [[ $dry -eq 1 ]]; then printf '%q ' "${cmd[@]}"; echo; else exec "${cmd[@]}"; fi
