#!/usr/bin/env bash
# The stack without Docker, on a host with the vLLM image's and the trainer image's packages installed: starts the
# vLLM entrypoint (docker/vllm/serve.py), waits for its /health, runs the trainer's entry to the end, keeps a
# per-process GPU memory trace, then stops the server. Used by the benchmarks; the compose stack runs the same two
# entrypoints.
#
#   benchmarks/run_stack.sh ENV_FILE [NAME=VALUE ...]
#
# Settings: ENV_FILE (compose's .env format: NAME=VALUE lines, values taken literally), then the NAME=VALUE
# arguments. The run's files land in RUNS_DIR/RUN_NAME as in the stack, with vllm.log and gpu-memory.csv beside
# them. VLLM_PYTHON and TRAINER_PYTHON name the interpreters of the two environments (default python3);
# VLLM_START_TIMEOUT is how many seconds the server may take to become healthy (default 1800).
# Exit status: the trainer's.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
if (($# < 1)) || [[ ! -f "$1" ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 2
fi
env_file=$1; shift
VLLM_PYTHON=${VLLM_PYTHON:-python3}
TRAINER_PYTHON=${TRAINER_PYTHON:-python3}
absolute() { if [[ $1 == */* ]]; then echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; else echo "$1"; fi; }
VLLM_PYTHON=$(absolute "$VLLM_PYTHON") TRAINER_PYTHON=$(absolute "$TRAINER_PYTHON")

# compose's .env semantics (no shell expansion, backslashes kept), turned into exports
eval "$("$TRAINER_PYTHON" - "$env_file" "$@" <<'EOF'
import shlex, sys
pairs = [line.split("=", 1) for line in open(sys.argv[1]).read().splitlines()
         if "=" in line and not line.lstrip().startswith("#")]
pairs += [arg.split("=", 1) for arg in sys.argv[2:]]
for name, value in pairs:
    print(f"export {name.strip()}={shlex.quote(value.strip())}")
EOF
)"
export VLLM_SERVER_HOST=${VLLM_SERVER_HOST:-127.0.0.1} PYTHONUNBUFFERED=1
RUNS_DIR=${RUNS_DIR:-runs}; export RUNS_DIR
run_dir="$RUNS_DIR/${RUN_NAME:?set RUN_NAME in $env_file or as an argument}"
mkdir -p "$run_dir"
port=${VLLM_SERVER_PORT:-8000}

setsid "$VLLM_PYTHON" "$REPO/docker/vllm/serve.py" > "$run_dir/vllm.log" 2>&1 &
server=$!  # serve.py execs the server: with setsid this is its process group
trap 'kill -- "-$server" 2>/dev/null || true; kill "$sampler" 2>/dev/null || true' EXIT
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-compute-apps=gpu_bus_id,pid,process_name,used_memory --format=csv,noheader -lms 2000 \
    > "$run_dir/gpu-memory.csv" &
  sampler=$!
else
  sampler=
fi

SECONDS=0
until "$TRAINER_PYTHON" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=5)" \
    2> /dev/null; do
  if ! kill -0 "$server" 2> /dev/null; then echo "vLLM exited; last lines of $run_dir/vllm.log:"; tail -30 "$run_dir/vllm.log"; exit 1; fi
  if ((SECONDS > ${VLLM_START_TIMEOUT:-1800})); then echo "vLLM not healthy after ${SECONDS}s"; exit 1; fi
  sleep 3
done
echo "vLLM healthy after ${SECONDS}s"

status=0
# the trainer image's WORKDIR and PYTHONPATH
(cd "$REPO/trainer" && PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$TRAINER_PYTHON" train_grpo_vllm.py) || status=$?
echo "trainer exit $status"
exit $status
