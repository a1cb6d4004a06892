#!/usr/bin/env bash
# Builds both images (docker compose build; Docker Engine with Compose 2.24.0 or newer) and prints their sizes.
#   bash scripts/build_images.sh              # extra arguments go to `docker compose build`, e.g. --no-cache
set -euo pipefail
cd "$(dirname "$0")/.."
docker compose build "$@" vllm trainer
echo "image sizes (uncompressed, as docker image ls counts them):"
for image in $(docker compose config --images vllm trainer | sort -u); do
  docker image inspect --format '{{.Size}}' "$image" | awk -v name="$image" '{printf "  %-40s %5.1f GB\n", name, $1 / 1e9}'
done
