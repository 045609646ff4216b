#!/usr/bin/env bash
# Idempotent set-up, sourced by the other scripts: `setup_python [test]`. Always: torch, and tqdm + matplotlib for
# the main job; with `test`: the test tools.
# Keeps a torch that is already installed. Where there is none, installs the CPU wheel of torch 2.13.0, never a
# CUDA build: a plain `pip install torch` would pull several GB of CUDA packages.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
TORCH_CPU="torch==2.13.0+cpu"
# accelerate and transformers: the frameworks whose documented flows the tests run distopt through (accelerate's
# FSDP2 route, HF Trainer's checkpoints); both take the installed torch as it is.
TEST_DEPS=("pytest>=8" "pytest-xdist>=3.5" "expecttest>=0.2" "numpy" "kron-torch==0.3.3" "accelerate==1.15.0"
           "transformers==5.24.0")
# The peers whose own code the flag tests compare against (HeavyBall's flags, adv_optm's Kourkoutas-beta, OrthoGrad
# and atan2, optimi's decouple_lr). Installed without their dependencies, so that pip never touches torch.
PEER_TEST_DEPS=("heavyball==3.2.1" "torch-optimi==0.3.3" "adv-optm==2.5.16" "prodigyopt==1.1.2" "schedulefree==1.4.1"
                "gram-newton-schulz==0.1.6" "torchao==0.18.0")
PEER_TEST_LIBS=("opt-einsum>=3.3")
# The main job's progress bar and loss plots (not needed by the library itself).
JOB_DEPS=("tqdm>=4.60" "matplotlib>=3.7")

setup_python() {
  if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "setup: no torch found; installing $TORCH_CPU (CPU build)"
    "$PYTHON" -m pip install --quiet "$TORCH_CPU" \
      || "$PYTHON" -m pip install --quiet "$TORCH_CPU" --index-url https://download.pytorch.org/whl/cpu
  fi
  if ! "$PYTHON" -c "import tqdm, matplotlib" >/dev/null 2>&1; then
    echo "setup: installing the main job's tools: ${JOB_DEPS[*]}"
    "$PYTHON" -m pip install --quiet "${JOB_DEPS[@]}"
  fi
  if [ "${1:-}" = "test" ]; then
    if ! "$PYTHON" -c "import pytest, xdist, expecttest, numpy, kron_torch, accelerate, transformers" >/dev/null 2>&1; then
      echo "setup: installing test tools: ${TEST_DEPS[*]}"
      # torch is already satisfied here, so pip resolves nothing toward a CUDA build.
      "$PYTHON" -m pip install --quiet "${TEST_DEPS[@]}"
    fi
    if ! "$PYTHON" -c "import heavyball, optimi, adv_optm, opt_einsum, torchao" >/dev/null 2>&1; then
      echo "setup: installing the reference peers: ${PEER_TEST_DEPS[*]} (without dependencies)"
      "$PYTHON" -m pip install --quiet "${PEER_TEST_LIBS[@]}"
      "$PYTHON" -m pip install --quiet --no-deps "${PEER_TEST_DEPS[@]}"
    fi
  fi
}
