#!/usr/bin/env bash
# Make the environment in which `python -m mlmjax.bench --framework diffusers_flax` runs its reference:
#
#   launch/diffusers_flax_env.sh [DIR]          # default DIR: /tmp/mlmjax-diffusers-flax
#   python -m mlmjax.bench --framework jax,torch,diffusers_flax \
#       --diffusers_flax_python /tmp/mlmjax-diffusers-flax/bin/python --markdown
#
# diffusers' Flax models ended with diffusers 0.39 and transformers' with 4.57, while mlmjax needs
# transformers 5: DIR is a virtual environment that holds those versions and sees everything else (jax,
# flax, optax, torch, safetensors, mlmjax) in the environment of the Python that runs this script
# ($MLMJAX_PYTHON, default python3). It prints DIR/bin/python. Run it again to remake DIR.
set -euo pipefail

usage="usage: launch/diffusers_flax_env.sh [DIR]"
if [ $# -ge 1 ] && { [ "$1" = -h ] || [ "$1" = --help ]; }; then
  echo "$usage"
  sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 0
fi
if [ $# -gt 1 ]; then
  echo "$usage" >&2
  exit 2
fi
dir=${1:-/tmp/mlmjax-diffusers-flax}
python=${MLMJAX_PYTHON:-python3}
site_of() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
parent=$(site_of "$python")
"$python" -c 'import jax, flax, optax, torch, safetensors, mlmjax' 2>/dev/null || {
  echo "error: $python lacks jax, flax, optax, torch, safetensors or mlmjax; install mlmjax with its bench" \
       "extra first: pip install -e '.[bench]'" >&2
  exit 1
}
rm -rf "$dir"
"$python" -m venv "$dir"
# The parent environment's packages come after the environment's own, so its own versions win; a .pth
# line that imports runs addsitedir, which also reads the parent's .pth files (an editable mlmjax).
echo "import site; site.addsitedir('$parent')" > "$(site_of "$dir/bin/python")/zz_mlmjax_parent.pth"
# Only the libraries that differ, without their dependencies (the parent's serve), never touching the
# parent: huggingface-hub and tokenizers at the versions transformers 4.57 accepts.
"$dir/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --ignore-installed \
  diffusers==0.39.0 transformers==4.57.6 tokenizers==0.22.1 huggingface-hub==0.36.2
"$dir/bin/python" -c 'from diffusers import FlaxUNet2DConditionModel; from transformers import FlaxCLIPTextModel' \
  2>/dev/null || { echo "error: $dir: diffusers-Flax does not import; see $dir/bin/python -c" \
                        "'import diffusers, transformers'" >&2; exit 1; }
echo "$dir/bin/python"
