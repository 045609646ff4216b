#!/usr/bin/env bash
# The benchmark peers (launch/bench.py): `bash scripts/peers.sh [--dion DIR] [--shampoo DIR]`.
# Installs the `peers` extra of pyproject.toml (heavyball, torch-optimi, kron-torch, from PyPI) with distopt in
# editable mode. microsoft/dion is not on PyPI: with --dion DIR, it is cloned into DIR (outside this repository)
# and the bench is told where with --dion-path DIR or DISTOPT_DION_PATH=DIR. Likewise facebookresearch/optimizers
# (Distributed Shampoo) with --shampoo DIR: the tests and the bench read DISTOPT_SHAMPOO_PATH=DIR.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
setup_python

DION_DIR=""
SHAMPOO_DIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dion) DION_DIR="${2:?--dion needs a directory}"; shift 2 ;;
    --shampoo) SHAMPOO_DIR="${2:?--shampoo needs a directory}"; shift 2 ;;
    *) echo "peers.sh: unknown argument $1 (usage: peers.sh [--dion DIR] [--shampoo DIR])" >&2; exit 2 ;;
  esac
done

# torch is already satisfied here, so pip resolves nothing toward a CUDA build.
"$PYTHON" -m pip install --quiet -e "$ROOT[peers]"
echo "peers: installed the peers extra (heavyball, torch-optimi, kron-torch)"

# clone_outside NAME DIR URL PACKAGE: clone URL into DIR (outside this repository) unless DIR holds PACKAGE already.
clone_outside() {
  mkdir -p "$(dirname "$2")"
  case "$(cd "$(dirname "$2")" && pwd)/" in
    "$ROOT"/*) echo "peers.sh: clone $1 outside this repository, not into $2" >&2; exit 2 ;;
  esac
  if [ ! -f "$2/$4/__init__.py" ]; then
    git clone --depth 1 "$3" "$2"
  fi
}

if [ -n "$DION_DIR" ]; then
  clone_outside dion "$DION_DIR" https://github.com/microsoft/dion dion
  echo "peers: dion at $DION_DIR; run: python launch/bench.py --scenario muon --dion-path $DION_DIR"
  echo "       (or export DISTOPT_DION_PATH=$DION_DIR)"
fi

if [ -n "$SHAMPOO_DIR" ]; then
  clone_outside "Distributed Shampoo" "$SHAMPOO_DIR" https://github.com/facebookresearch/optimizers distributed_shampoo
  echo "peers: Distributed Shampoo at $SHAMPOO_DIR; export DISTOPT_SHAMPOO_PATH=$SHAMPOO_DIR"
fi
