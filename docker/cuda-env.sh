#!/bin/sh
# Runs a command with the CUDA user-mode driver it needs.
# The images carry PyTorch 2.11 built for CUDA 13.0, which needs a host driver >= 580. On an older host driver
# (the R535 branch these hosts were set up with) NVIDIA's forward-compatibility libraries in the image
# (/usr/local/cuda-13.0/compat, datacenter GPUs such as H100 only) stand in for the host's libcuda.
# On a host driver >= 580 they must not be used: they are older than the driver then.
set -eu
COMPAT_DIR=${CUDA_COMPAT_DIR:-/usr/local/cuda-13.0/compat}
MIN_NATIVE_DRIVER=${CUDA_MIN_NATIVE_DRIVER:-580}

driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1 || true)
major=${driver%%.*}
case "$major" in
  ''|*[!0-9]*)
    echo "cuda-env: no NVIDIA driver visible (is the NVIDIA container runtime on?); starting without GPU setup" >&2 ;;
  *)
    if [ "$major" -lt "$MIN_NATIVE_DRIVER" ]; then
      if [ -d "$COMPAT_DIR" ]; then
        echo "cuda-env: host driver $driver < $MIN_NATIVE_DRIVER: using CUDA forward compatibility from $COMPAT_DIR" >&2
        LD_LIBRARY_PATH="$COMPAT_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        export LD_LIBRARY_PATH
      else
        echo "cuda-env: host driver $driver < $MIN_NATIVE_DRIVER and no $COMPAT_DIR: CUDA 13 will not start; upgrade the driver" >&2
      fi
    fi ;;
esac
exec "$@"
