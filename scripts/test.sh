#!/usr/bin/env bash
# Sets up a virtual environment with the CPU build of torch and runs the whole test suite.
# No GPU and no network beyond the package index are needed; the conformance fixtures are read
# from ../shared/conformance (MEMCLI_CONFORMANCE_DIR overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q "${MEMCLI_TORCH:-torch==2.13.0}"
python -m pip install -q -e '.[test]'
python -m pytest -q "$@"
