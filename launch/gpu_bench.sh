#!/usr/bin/env bash
# The GPU checks of the README's benchmark table, on one CUDA machine, each time-boxed:
#
#   launch/gpu_bench.sh OUT_DIR [BENCHMARK ...]
#   launch/gpu_bench.sh /tmp/gpu dreambooth_off      # the one that gives DreamBooth's MFU
#
# 1. cuDNN's fused attention against float32 attention at SD 1.5's shapes (tests/test_attention.py);
# 2. the benchmarks named (default: all, in this order), SD 1.5 train steps in bfloat16 at 512 px with
#    random weights, JAX and the PyTorch reference on the same GPU: dreambooth_off, dreambooth_on (one
#    instance + one class image, UNet + text encoder, AdamW; MLM off, on), ti_off, ti_on (Textual
#    Inversion, batch 4), and dreambooth_off_chunked (JAX only, the CPU's chunked attention instead of
#    cuDNN's). The achieved share of the card's bf16 matmul peak is the model FLOP utilisation.
# Each benchmark writes OUT_DIR/<name>.json (python -m mlmjax.bench --json), with a profile of three more
# JAX steps (where the time goes: by kind of operation, by model and pass; traces in OUT_DIR/profile);
# everything printed goes to OUT_DIR/log.txt too. On an H100 the JAX side of one benchmark takes about
# 4 minutes, most of it the cold compile (154 s for DreamBooth), and the PyTorch side about 1. Environment: MLMJAX_PYTHON (default
# python3), MLMJAX_GPU_BENCH_REPEATS (10), MLMJAX_GPU_BENCH_STEP_SECONDS, the limit of each side of each
# benchmark (300; a JAX side cut off keeps what it had measured: compiled, timed, FLOPs counted last).
# README tables from the JSON files: python -m mlmjax.bench_report OUT_DIR/*.json.
set -uo pipefail

usage="usage: launch/gpu_bench.sh OUT_DIR [BENCHMARK ...]"
if [ $# -ge 1 ] && { [ "$1" = -h ] || [ "$1" = --help ]; }; then
  echo "$usage"
  awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "${BASH_SOURCE[0]}"
  exit 0
fi
if [ $# -lt 1 ]; then
  echo "$usage" >&2
  exit 2
fi
out=$1
shift
declare -A flags=(
  [dreambooth_off]="--methods dreambooth --mlm off"
  [dreambooth_on]="--methods dreambooth --mlm on"
  [ti_off]="--methods ti --mlm off"
  [ti_on]="--methods ti --mlm on"
  [dreambooth_off_chunked]="--methods dreambooth --mlm off --framework jax --attention chunked"
)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(dreambooth_off dreambooth_on ti_off ti_on dreambooth_off_chunked)
for name in "${names[@]}"; do
  if [ -z "${flags[$name]:-}" ]; then
    echo "launch/gpu_bench.sh: unknown benchmark '$name'; choose from ${!flags[*]}" >&2
    exit 2
  fi
done
mkdir -p "$out"
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${MLMJAX_PYTHON:-python3}
repeats=${MLMJAX_GPU_BENCH_REPEATS:-10}
limit=${MLMJAX_GPU_BENCH_STEP_SECONDS:-300}
exec > >(tee -a "$out/log.txt") 2>&1

echo "== $(date -u '+%F %T UTC') $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
"$python" -c 'import jax, flax, torch; print("jax", jax.__version__, jax.devices(), "| flax", flax.__version__,
"| torch", torch.__version__, torch.cuda.get_device_name())'

echo "== cuDNN attention against float32 attention"
timeout 120 "$python" -m pytest -q -p no:cacheprovider tests/test_attention.py -k cudnn

bench() {  # bench NAME FLAGS...: one time-boxed benchmark run, its rows in OUT_DIR/NAME.json
  local name=$1
  shift
  echo "== $name: $*"
  # Each side's own limit keeps the driver alive to write the JSON; the outer one covers the peaks too.
  timeout $((3 * limit)) "$python" -m mlmjax.bench --size sd15 --compute_dtype bfloat16 --repeats "$repeats" \
    --warmup 3 --timeout "$limit" --json "$out/$name.json" --profile "$out/profile" "$@"
  echo "== $name: exit status $?"
}
for name in "${names[@]}"; do
  # shellcheck disable=SC2086  # the flags are words
  bench "$name" ${flags[$name]}
done
echo "== done $(date -u '+%T UTC')"
