#!/usr/bin/env bash
# Regenerates each image's constraints file (docker/<image>/constraints.txt): every package the image installs,
# at one version, resolved by uv for the image's own Python and platform (PyPI wheels only, as the images
# install them). Run after changing a requirements file, a Dockerfile pin or the Python version:
#   bash docker/lock.sh            # needs uv (tests/requirements-trainer-cpu.txt pins the one the images use)
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-uv}

python_version() {  # the exact Python an image builds, from its Dockerfile
  sed -n 's/^ARG PYTHON_VERSION=//p' "docker/$1/Dockerfile"
}

lock() {  # image, then the requirement files it installs ("-" is standard input)
  local image=$1; shift
  # --no-config and the explicit index keep this machine's own uv or pip settings out of the lock.
  "$UV" pip compile --quiet --no-config --index-url https://pypi.org/simple \
    --python-version "$(python_version "$image")" --python-platform x86_64-manylinux_2_35 \
    --only-binary :all: --custom-compile-command "bash docker/lock.sh" \
    --output-file "docker/$image/constraints.txt" "$@"
}

lock vllm docker/vllm/requirements.txt
# torch is pinned in the trainer's Dockerfile, not in its requirements.txt: the CPU tests install that file beside
# a CPU build of torch.
grep -o 'torch==[0-9.]*' docker/trainer/Dockerfile | lock trainer - docker/trainer/requirements.txt
