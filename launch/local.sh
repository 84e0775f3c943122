#!/usr/bin/env bash
# Run one training on this machine: launch/local.sh CONFIG WORKDIR [--config.key=value ...]
#
#   launch/local.sh configs/ti.py /tmp/ti --config.mlm.weight=0
#
# The TPU pod and multi-node GPU launchers (tpu_pod.sh, gpu_multinode.sh) and sweep.py come with the
# sharding work (issue 6).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
cd "$(dirname "$0")/.."
exec python -m mlmjax.train --config "$config" --workdir "$workdir" "$@"
