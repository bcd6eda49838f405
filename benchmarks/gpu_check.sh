#!/usr/bin/env bash
# The prepared GPU check (docs/gpu_check.md). On the GPU machine: installs the wheels of .whl/
# (made by `make gpu-wheels`) into a temporary target, puts it and the repository on
# PYTHONPATH and runs benchmarks/gpu_check.py; figures and logs go to $OUT.
#   bash benchmarks/gpu_check.sh             # GPU machine (Python 3.12, its own torch)
#   bash benchmarks/gpu_check.sh --dry-run   # any machine, CPU, with the local environment
# PYTHON: the interpreter (default: .venv/bin/python when it exists, else python3).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export OUT="${OUT:-$REPO/output/gpu_check}"
mkdir -p "$OUT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ " $* " == *" --dry-run "* ]]; then
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
else
  SITE="${GPU_CHECK_SITE:-/tmp/lvis_longtail_site}"
  shopt -s nullglob
  wheels=(.whl/*.whl)
  if (( ${#wheels[@]} == 0 )); then
    echo "no wheels in .whl/: run 'make gpu-wheels' on a machine with a package registry" >&2
    exit 2
  fi
  "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$SITE" --upgrade "${wheels[@]}"
  export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
"$PYTHON" benchmarks/gpu_check.py "$@" 2>&1 | tee -a "$OUT/gpu_check.out"
exit "${PIPESTATUS[0]}"
