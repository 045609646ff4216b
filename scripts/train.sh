#!/usr/bin/env bash
# The main job: set up if needed, then train a small GPT with FSDP2 + distopt on 2 gloo ranks (CPU, or NCCL on GPUs).
# Extra arguments go to launch/train.py, e.g. `bash scripts/train.sh --optimizer soap --steps 100` or `--resume`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
setup_python
NPROC="${NPROC:-2}"
cd "$ROOT"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m torch.distributed.run --standalone \
  --nproc-per-node "$NPROC" launch/train.py "$@"
