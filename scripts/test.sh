#!/usr/bin/env bash
# The test suite: set up if needed, then run every test on 2 workers. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
setup_python test
cd "$ROOT"
exec "$PYTHON" -m pytest -n "${WORKERS:-2}" "$@"  # no path given: pyproject's testpaths (tests/)
