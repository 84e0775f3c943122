#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one host or a pod): create or reuse the slice, copy this checkout to
# every worker, install, run the same `python -m mlmjax.train ... --distributed` on all workers, and
# fetch the results from worker 0. Rerunning the same command resumes a preempted run.
#
#   launch/tpu_pod.sh [OPTIONS] CONFIG WORKDIR [--config.KEY=VALUE ...]
#
#   launch/tpu_pod.sh --name ti-pod --zone us-central2-b --accelerator v4-32 --spot \
#       --setup 'sudo mount -t nfs 10.0.0.2:/share /mnt/share' \
#       configs/ti.py /mnt/share/runs/ti --config.pretrained=/mnt/share/sd15
#
# WORKDIR must be one folder that every worker sees (an NFS/Filestore share or a gcsfuse mount):
# orbax checkpoints are written by all hosts together, and a resume reads them back. See
# launch/README.md for the whole flow.
set -euo pipefail

usage() {
  cat <<EOF
usage: launch/tpu_pod.sh [OPTIONS] CONFIG WORKDIR [--config.KEY=VALUE ...]

Creates (or reuses) a Cloud TPU VM slice, copies this checkout to every worker, installs mlmjax
with jax[tpu], runs 'python -m mlmjax.train --config CONFIG --workdir WORKDIR --distributed ...' on
all workers, then fetches metrics.jsonl, config.json, run.json, loss_curve.png and samples/ from
worker 0 into the results folder. Rerun the same command after a preemption: the run resumes.

WORKDIR must be a path that every worker sees (NFS/Filestore, or a bucket mounted with gcsfuse
through --setup): mlmjax writes it with ordinary file operations, so gs:// URLs are refused.

Options (environment variable, default):
  --name NAME          TPU VM name (TPU_NAME, ${TPU_NAME:-mlmjax})
  --zone ZONE          zone (TPU_ZONE, ${TPU_ZONE:-us-central2-b})
  --project PROJECT    project (TPU_PROJECT, ${TPU_PROJECT:-the gcloud default})
  --accelerator TYPE   accelerator type, e.g. v4-8, v4-32, v5litepod-16, v6e-16
                       (TPU_ACCELERATOR, ${TPU_ACCELERATOR:-v4-32})
  --version VERSION    TPU software version, e.g. tpu-ubuntu2204-base (v4), v2-alpha-tpuv5-lite
                       (v5e), v2-alpha-tpuv6e (v6e) (TPU_VERSION, ${TPU_VERSION:-tpu-ubuntu2204-base})
  --spot               create a Spot VM (TPU_SPOT=1)
  --preemptible        create a preemptible VM (TPU_PREEMPTIBLE=1)
  --python VERSION     Python the workers' venv gets, through uv (TPU_PYTHON, ${TPU_PYTHON:-3.12})
  --jax SPEC           the jax requirement (TPU_JAX, ${TPU_JAX:-jax[tpu]})
  --remote_dir DIR     where the checkout goes on each worker (TPU_REMOTE_DIR, ${TPU_REMOTE_DIR:-mlmjax},
                       relative to the home folder)
  --setup CMD          a shell command run on every worker after the install, e.g. mounting the
                       share that holds WORKDIR (TPU_SETUP)
  --copy SRC=DEST      copy the local file or folder SRC to DEST on every worker before training
                       (repeatable; e.g. a base model or concept photos)
  --results DIR        local folder for the results (TPU_RESULTS, default tpu-results/<basename of WORKDIR>)
  --retries N          after a failed run (e.g. the slice was preempted), recreate or reuse the
                       slice and resume, up to N times (TPU_RETRIES, ${TPU_RETRIES:-0})
  --skip_setup         do not copy or install (the workers already have this checkout)
  --delete             delete the TPU VM after a run that finished (TPU_DELETE=1)
  --dry-run            print the commands instead of running them
  -h, --help           this message
EOF
}

die_usage() {
  echo "error: $*" >&2
  echo "run 'launch/tpu_pod.sh --help' for the options" >&2
  exit 2
}

name=${TPU_NAME:-mlmjax}
zone=${TPU_ZONE:-us-central2-b}
project=${TPU_PROJECT:-}
accelerator=${TPU_ACCELERATOR:-v4-32}
version=${TPU_VERSION:-tpu-ubuntu2204-base}
spot=${TPU_SPOT:-0}
preemptible=${TPU_PREEMPTIBLE:-0}
python_version=${TPU_PYTHON:-3.12}
jax_spec=${TPU_JAX:-jax[tpu]}
remote_dir=${TPU_REMOTE_DIR:-mlmjax}
setup_cmd=${TPU_SETUP:-}
results=${TPU_RESULTS:-}
retries=${TPU_RETRIES:-0}
delete=${TPU_DELETE:-0}
skip_setup=0
dry_run=0
copies=()

need_value() {  # need_value OPTION REMAINING_ARG_COUNT
  [ "$2" -ge 2 ] || die_usage "$1 needs a value"
}

while [ $# -gt 0 ]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --name) need_value "$1" $#; name=$2; shift 2 ;;
    --zone) need_value "$1" $#; zone=$2; shift 2 ;;
    --project) need_value "$1" $#; project=$2; shift 2 ;;
    --accelerator) need_value "$1" $#; accelerator=$2; shift 2 ;;
    --version) need_value "$1" $#; version=$2; shift 2 ;;
    --python) need_value "$1" $#; python_version=$2; shift 2 ;;
    --jax) need_value "$1" $#; jax_spec=$2; shift 2 ;;
    --remote_dir) need_value "$1" $#; remote_dir=$2; shift 2 ;;
    --setup) need_value "$1" $#; setup_cmd=$2; shift 2 ;;
    --copy) need_value "$1" $#; copies+=("$2"); shift 2 ;;
    --results) need_value "$1" $#; results=$2; shift 2 ;;
    --retries) need_value "$1" $#; retries=$2; shift 2 ;;
    --name=*|--zone=*|--project=*|--accelerator=*|--version=*|--python=*|--jax=*|--remote_dir=*|--setup=*|--copy=*|--results=*|--retries=*)
      # --option=value: the same as --option value
      option=${1%%=*} value=${1#*=}
      shift
      set -- "$option" "$value" "$@" ;;
    --spot) spot=1; shift ;;
    --preemptible) preemptible=1; shift ;;
    --skip_setup) skip_setup=1; shift ;;
    --delete) delete=1; shift ;;
    --dry-run|--dry_run) dry_run=1; shift ;;
    --) shift; break ;;
    -*) die_usage "unknown option $1" ;;
    *) break ;;
  esac
done

[ $# -ge 2 ] || die_usage "CONFIG and WORKDIR are required"
config=$1 workdir=$2
shift 2
overrides=("$@")
for override in ${overrides[@]+"${overrides[@]}"}; do  # (the +: bash 3.2, macOS's, with set -u)
  case $override in
    --*) ;;  # --config.KEY=VALUE, or another mlmjax.train flag such as --verbosity=1
    *) die_usage "'$override' is not a flag of mlmjax.train (overrides look like --config.KEY=VALUE)" ;;
  esac
done
case $workdir in
  gs://*)
    # mlmjax writes the workdir with open()/os calls; TPU_ALLOW_GS=1 skips this check.
    [ "${TPU_ALLOW_GS:-0}" = 1 ] || die_usage "WORKDIR $workdir: mlmjax writes workdirs with ordinary file" \
      "operations; mount the bucket on every worker (e.g. --setup 'gcsfuse --implicit-dirs BUCKET /mnt/BUCKET')" \
      "and give the mounted path" ;;
esac
[ -f "${config%%:*}" ] || die_usage "CONFIG ${config%%:*}: file not found (a path inside this checkout, e.g. configs/ti.py)"
[[ $retries =~ ^[0-9]+$ ]] || die_usage "--retries $retries: not a non-negative integer"
if [ "$spot" = 1 ] && [ "$preemptible" = 1 ]; then die_usage "--spot and --preemptible exclude each other"; fi
for copy in ${copies[@]+"${copies[@]}"}; do
  [[ $copy == ?*=?* ]] || die_usage "--copy $copy: expected SRC=DEST"
done
results=${results:-tpu-results/$(basename "$workdir")}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The workers run CONFIG from their copy of this checkout: name it relative to the checkout.
config_file=${config%%:*}
config_path="$(cd "$(dirname "$config_file")" && pwd)/$(basename "$config_file")"
case $config_path in
  "$repo"/*) config="${config_path#"$repo"/}${config#"$config_file"}" ;;
  *) die_usage "CONFIG $config_file: not inside this checkout ($repo), which is what the workers get" ;;
esac
location=(--zone="$zone")
if [ -n "$project" ]; then location+=(--project="$project"); fi
tpu=(gcloud compute tpus tpu-vm)

# The arguments as one shell command line: each quoted (in single quotes) where it needs it.
quote() {
  local out=() arg
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

# Runs (or, with --dry-run, prints) one command.
run() {
  if [ "$dry_run" = 1 ]; then
    quote "$@"
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}

remote_python=".venv/bin/python"
train_line="cd $(quote "$remote_dir") && $(quote "$remote_python" -m mlmjax.train --config "$config" --workdir "$workdir" --distributed ${overrides[@]+"${overrides[@]}"})"

ensure_tpu() {
  local state
  if [ "$dry_run" = 1 ]; then
    echo "# create the slice unless it exists:"
    run "${tpu[@]}" describe "$name" "${location[@]}" --format='value(state)'
  elif state=$("${tpu[@]}" describe "$name" "${location[@]}" --format='value(state)' 2>/dev/null); then
    case $state in
      READY) echo "reusing TPU VM $name ($zone)" >&2; return ;;
      PREEMPTED|TERMINATED|STOPPED)
        echo "TPU VM $name is $state: deleting and recreating it (the workdir keeps the checkpoints)" >&2
        run "${tpu[@]}" delete "$name" "${location[@]}" --quiet ;;
      *)
        echo "TPU VM $name is $state; waiting for READY" >&2
        for _ in $(seq 60); do
          sleep 20
          state=$("${tpu[@]}" describe "$name" "${location[@]}" --format='value(state)' 2>/dev/null || echo GONE)
          [ "$state" = READY ] && return
          [ "$state" = GONE ] && break
        done
        [ "$state" = READY ] || { echo "error: TPU VM $name is $state, not READY" >&2; exit 1; } ;;
    esac
  fi
  local create=("${tpu[@]}" create "$name" "${location[@]}" --accelerator-type="$accelerator" --version="$version")
  if [ "$spot" = 1 ]; then create+=(--spot); fi
  if [ "$preemptible" = 1 ]; then create+=(--preemptible); fi
  run "${create[@]}"
}

setup_workers() {
  local tarball
  if [ "$dry_run" = 1 ]; then
    tarball=/tmp/mlmjax-checkout.tar.gz
    echo "# pack this checkout (tracked and untracked files, .gitignore respected):"
    echo "(cd $(quote "$repo") && git ls-files -z --cached --others --exclude-standard | tar --null -czf $tarball -T -)"
  else
    tarball=$(mktemp "${TMPDIR:-/tmp}/mlmjax-checkout.XXXXXX")
    checkout_tarball=$tarball
    trap 'rm -f "$checkout_tarball"' EXIT
    if git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
      (cd "$repo" && git ls-files -z --cached --others --exclude-standard | tar --null -czf "$tarball" -T -)
    else
      tar -C "$repo" --exclude=.git --exclude='*.egg-info' --exclude=__pycache__ -czf "$tarball" .
    fi
  fi
  run "${tpu[@]}" scp "$tarball" "$name:mlmjax-checkout.tar.gz" --worker=all "${location[@]}"
  # uv brings the Python mlmjax needs (>= 3.11; the TPU images ship 3.10) without touching the system's.
  local install
  install="set -e; mkdir -p $(quote "$remote_dir") && tar -xzf mlmjax-checkout.tar.gz -C $(quote "$remote_dir")"
  install+=" && cd $(quote "$remote_dir")"
  install+=" && (command -v uv >/dev/null || python3 -m pip install --user --quiet uv) && export PATH=\$HOME/.local/bin:\$PATH"
  install+=" && ([ -x .venv/bin/python ] || uv venv --quiet --python $(quote "$python_version") .venv)"
  install+=" && uv pip install --quiet --python .venv/bin/python -e . $(quote "$jax_spec")"
  if [ -n "$setup_cmd" ]; then install+=" && $setup_cmd"; fi
  run "${tpu[@]}" ssh "$name" --worker=all "${location[@]}" --command="$install"
  local copy
  for copy in ${copies[@]+"${copies[@]}"}; do
    run "${tpu[@]}" ssh "$name" --worker=all "${location[@]}" --command="mkdir -p $(quote "$(dirname "${copy#*=}")")"
    run "${tpu[@]}" scp --recurse "${copy%%=*}" "$name:${copy#*=}" --worker=all "${location[@]}"
  done
}

train_on_all() {
  # The same command on every worker; jax.distributed.initialize() finds the coordinator itself on a
  # TPU slice. Each worker's output is streamed back here.
  run "${tpu[@]}" ssh "$name" --worker=all "${location[@]}" --command="$train_line"
}

fetch_results() {
  local pack
  pack="cd $(quote "$workdir") && tar -czf /tmp/mlmjax-results.tar.gz \$(ls -d metrics.jsonl config.json run.json loss_curve.png samples 2>/dev/null)"
  run "${tpu[@]}" ssh "$name" --worker=0 "${location[@]}" --command="$pack"
  run mkdir -p "$results"
  run "${tpu[@]}" scp "$name:/tmp/mlmjax-results.tar.gz" "$results/results.tar.gz" --worker=0 "${location[@]}"
  run tar -xzf "$results/results.tar.gz" -C "$results"
  run rm -f "$results/results.tar.gz"
  if [ "$dry_run" = 0 ]; then echo "results of $workdir (worker 0) in $results/" >&2; fi
}

attempt=0
while :; do
  ensure_tpu
  [ "$skip_setup" = 1 ] || setup_workers
  status=0
  train_on_all || status=$?
  [ "$status" = 0 ] && break
  attempt=$((attempt + 1))
  if [ "$attempt" -gt "$retries" ]; then
    echo "error: the run failed (exit $status); rerun the same command to resume from the last checkpoint" >&2
    exit "$status"
  fi
  echo "the run failed (exit $status); retry $attempt of $retries: it resumes from the last checkpoint" >&2
  sleep "${TPU_RETRY_SLEEP:-60}"
done
fetch_results
if [ "$delete" = 1 ]; then
  run "${tpu[@]}" delete "$name" "${location[@]}" --quiet
fi
