#!/usr/bin/env bash
#SBATCH --job-name=mlmjax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=mlmjax-%x-%j.out
#
# Train on several GPU nodes under SLURM: one process per node (its GPUs are that process's local
# devices), all started by srun with --distributed and the coordinator on the job's first node.
#
#   sbatch launch/gpu_multinode.sh CONFIG WORKDIR [--config.KEY=VALUE ...]
#   sbatch --nodes=4 --gpus-per-node=4 --time=12:00:00 launch/gpu_multinode.sh configs/ti.py /shared/runs/ti
#
# Submit from the repository root (or set MLMJAX_REPO): sbatch runs a copy of this script. WORKDIR
# must be on storage that every node sees. The #SBATCH lines above are defaults; sbatch's own
# options override them. Environment:
#   MLMJAX_PYTHON     the Python that has mlmjax and jax[cuda12] installed (default: python)
#   MLMJAX_REPO       the checkout (default: $SLURM_SUBMIT_DIR, where sbatch ran)
#   MLMJAX_PORT       the coordinator's port (default: 12000 + job id mod 20000)
#   MLMJAX_SRUN_ARGS  extra srun options, e.g. "--mpi=none --container-image=..."
#
# Preemption and time limits: SLURM preemption sends SIGTERM, on which mlmjax.train saves a
# checkpoint and exits; with --requeue the job comes back and resumes from it. Five minutes before
# the time limit (--signal=B:USR1@300) this script stops the run the same way and requeues the job
# (MLMJAX_REQUEUE=0: just stop), so a long run continues over several allocations by itself.
# Rerunning the same sbatch command on the same WORKDIR resumes too; a finished run does nothing.
set -euo pipefail

usage() {
  sed -n '/^# Train on several/,/^# Rerunning/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' 
}

if [ $# -ge 1 ] && { [ "$1" = -h ] || [ "$1" = --help ]; }; then
  usage
  exit 0
fi
if [ $# -lt 2 ]; then
  echo "usage: sbatch launch/gpu_multinode.sh CONFIG WORKDIR [--config.KEY=VALUE ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
for override in "$@"; do
  case $override in
    --*) ;;  # --config.KEY=VALUE, or another mlmjax.train flag such as --verbosity=1
    *) echo "error: '$override' is not a flag of mlmjax.train (overrides look like --config.KEY=VALUE)" >&2; exit 2 ;;
  esac
done
if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "error: not inside a SLURM job; submit with: sbatch launch/gpu_multinode.sh CONFIG WORKDIR [overrides]" >&2
  exit 2
fi

repo=${MLMJAX_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$repo"
[ -f "${config%%:*}" ] || { echo "error: CONFIG ${config%%:*}: file not found in $repo" >&2; exit 2; }

# The coordinator: process 0's node, the first of the job's nodes.
# (Not `| head -n 1`: with pipefail, scontrol killed by SIGPIPE would fail the job.)
hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
coordinator_host=${hosts%%$'\n'*}
if [ -z "$coordinator_host" ]; then
  echo "error: no host in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST" >&2
  exit 1
fi
port=${MLMJAX_PORT:-$((12000 + SLURM_JOB_ID % 20000))}
num_processes=${SLURM_NTASKS:-$(( ${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}} * ${SLURM_NTASKS_PER_NODE:-1} ))}
python=${MLMJAX_PYTHON:-python}
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

train=("$python" -m mlmjax.train --config "$config" --workdir "$workdir" "$@"
       --distributed --coordinator_address "$coordinator_host:$port" --num_processes "$num_processes")
echo "mlmjax: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $num_processes processes, coordinator $coordinator_host:$port" >&2

# One task per process; each appends its own rank (SLURM_PROCID, set by srun per task).
read -r -a srun_extra <<< "${MLMJAX_SRUN_ARGS:-}"
# shellcheck disable=SC2016  # $@ and $SLURM_PROCID expand in each task's shell, not here
srun --ntasks="$num_processes" --kill-on-bad-exit=1 ${srun_extra[@]+"${srun_extra[@]}"} \
  bash -c 'exec "$@" --process_id "$SLURM_PROCID"' mlmjax-task "${train[@]}" &
srun_pid=$!

near_time_limit=0
# shellcheck disable=SC2329  # invoked by the USR1 trap
on_time_limit() {
  near_time_limit=1
  echo "mlmjax: time limit near: stopping the run (it saves a checkpoint)" >&2
  kill -TERM "$srun_pid" 2>/dev/null || true
}
trap on_time_limit USR1
trap 'kill -TERM "$srun_pid" 2>/dev/null || true' TERM

# `wait` returns early when a trapped signal arrives; wait again until srun has really ended.
status=0
while :; do
  wait "$srun_pid" && status=0 || status=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done

if [ "$near_time_limit" = 1 ] && [ "${MLMJAX_REQUEUE:-1}" = 1 ]; then
  echo "mlmjax: requeueing job $SLURM_JOB_ID; it resumes from the checkpoint" >&2
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
