#!/usr/bin/env bash
# One prepared run on a lent GPU machine, from the repository root, with .gpu-bundle/
# (make gpu-bundle) carried along: installs the bundle, prints the environment, runs the
# CUDA tests and the engine and continuous benchmarks on the a6000-shaped model, writes
# summary.txt, records/*.json and gpu-check.tar.gz under $OUT; ends within 8 minutes.
#
#   bash bench/gpu_check.sh                       # every stage: env tests engine continuous
#   bash bench/gpu_check.sh engine --limit engine=200   # redo one stage, with more time
#   bash bench/gpu_check.sh --dry-run             # the same on this CPU, tiny and short
#
# Its Python is the machine's `python3` (3.12 with torch); a dry run takes the project's
# .venv where there is one; $PYTHON chooses another.  Details: bench/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=python3
  if [[ " $* " == *" --dry-run "* && -x .venv/bin/python ]]; then
    PYTHON=.venv/bin/python
  fi
fi
exec "$PYTHON" bench/gpu_check.py "$@"
