#!/usr/bin/env bash
# Run one training on this machine, on all its local devices (every GPU, every TPU core, or the CPU):
#
#   launch/local.sh CONFIG WORKDIR [--config.KEY=VALUE ...]
#   launch/local.sh configs/ti.py /tmp/ti --config.mlm.weight=0
#
# The same command on the same WORKDIR resumes a stopped run; a finished run does nothing.
# Environment: MLMJAX_PYTHON, the Python that has mlmjax installed (default: python). The devices are
# JAX's: JAX_PLATFORMS=cpu forces the CPU, CUDA_VISIBLE_DEVICES picks GPUs. Relative CONFIG and WORKDIR
# paths are read from the current folder. Several machines: launch/tpu_pod.sh, launch/gpu_multinode.sh;
# a grid of runs: launch/sweep.py --launcher launch/local.sh (see launch/README.md).
set -euo pipefail

usage="usage: launch/local.sh CONFIG WORKDIR [--config.KEY=VALUE ...]"
if [ $# -ge 1 ] && { [ "$1" = -h ] || [ "$1" = --help ]; }; then
  echo "$usage"
  sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 0
fi
if [ $# -lt 2 ]; then
  echo "$usage" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
# This checkout's mlmjax, whether or not it is pip-installed, from any current folder.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "${MLMJAX_PYTHON:-python}" -m mlmjax.train --config "$config" --workdir "$workdir" "$@"
