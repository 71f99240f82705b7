#!/usr/bin/env bash
# The one-command GPU check (docs/GPU_CHECK.md): CUDA tests, search-step benchmarks, an epoch-like run
# over image files, torchrun on every GPU; JSON and Markdown into one folder, in under 8 minutes.
#   benchmarks/gpu_check.sh [--out DIR] [--budget SECONDS] [--parts a,b] [--smoke]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
