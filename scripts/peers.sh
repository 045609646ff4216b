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

if [ -n "$DION_DIR" ]; then
  mkdir -p "$(dirname "$DION_DIR")"
  case "$(cd "$(dirname "$DION_DIR")" && pwd)/" in
    "$ROOT"/*) echo "peers.sh: clone dion outside this repository, not into $DION_DIR" >&2; exit 2 ;;
  esac
  if [ ! -f "$DION_DIR/dion/__init__.py" ]; then
    git clone --depth 1 https://github.com/microsoft/dion "$DION_DIR"
  fi
  echo "peers: dion at $DION_DIR; run: python launch/bench.py --scenario muon --dion-path $DION_DIR"
  echo "       (or export DISTOPT_DION_PATH=$DION_DIR)"
fi

if [ -n "$SHAMPOO_DIR" ]; then
  mkdir -p "$(dirname "$SHAMPOO_DIR")"
  case "$(cd "$(dirname "$SHAMPOO_DIR")" && pwd)/" in
    "$ROOT"/*) echo "peers.sh: clone Distributed Shampoo outside this repository, not into $SHAMPOO_DIR" >&2; exit 2 ;;
  esac
  if [ ! -f "$SHAMPOO_DIR/distributed_shampoo/__init__.py" ]; then
    git clone --depth 1 https://github.com/facebookresearch/optimizers "$SHAMPOO_DIR"
  fi
  echo "peers: Distributed Shampoo at $SHAMPOO_DIR; export DISTOPT_SHAMPOO_PATH=$SHAMPOO_DIR"
fi
