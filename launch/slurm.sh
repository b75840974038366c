#!/usr/bin/env bash
# Run a jaxretina job on a SLURM GPU cluster: one process per node, all GPUs of a node per process.
#
#   launch/slurm.sh --nodes 4 --gpus-per-node 8 [--partition P] [--time 48:00:00] [--dry-run] -- \
#       --config configs/keepfit.py:paper --workdir /scratch/keepfit --config.data.data_dir=/data/tfds
#
# srun starts the same `python -m jaxretina.main ...` on every node; jax.distributed.initialize()
# reads the SLURM environment (coordinator = first node). --dry-run (anywhere on the line) prints the
# sbatch script and submits nothing.
set -euo pipefail
nodes=1 gpus=8 partition="" time_limit="24:00:00" dry=0 job_name="jaxretina"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes="$2"; shift 2 ;;
    --gpus-per-node) gpus="$2"; shift 2 ;;
    --partition) partition="$2"; shift 2 ;;
    --time) time_limit="$2"; shift 2 ;;
    --job-name) job_name="$2"; shift 2 ;;
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
[[ $# -gt 0 ]] || { echo "usage: $0 [--nodes N] [--gpus-per-node G] [--partition P] [--dry-run] -- JOB ARGS" >&2; exit 2; }
script="#!/usr/bin/env bash
#SBATCH --job-name=$job_name
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus
#SBATCH --time=$time_limit
${partition:+#SBATCH --partition=$partition}
set -euo pipefail
srun python3 -m jaxretina.main $(printf '%q ' "$@")"
# A here-string, not a pipe: an sbatch that exits before reading all of it cannot SIGPIPE the launcher.
if [[ $dry -eq 1 ]]; then echo "$script"; else sbatch <<< "$script"; fi
