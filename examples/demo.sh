#!/usr/bin/env bash
# Sets up memcli in .venv, injects examples/notes into the pool "demo" and asks about them.
#   bash examples/demo.sh           the default model (memoryllm-8b-chat: ~39 GB download once,
#                                   a CUDA GPU with 12 GB for 4-bit)
#   bash examples/demo.sh --smoke   offline smoke test on the tiny random checkpoint in
#                                   examples/tiny-model: it checks the plumbing; its answers are noise
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q -e .
options=()
ask=(--max-new-tokens 64)
if [ "${1:-}" = "--smoke" ]; then
  export MEMCLI_HOME="${MEMCLI_HOME:-$(mktemp -d)}"
  export HF_HUB_OFFLINE=1
  options=(--model examples/tiny-model --device cpu)
  ask=(--max-new-tokens 12)
  echo "smoke test: tiny random model, data in $MEMCLI_HOME" >&2
fi
memcli "${options[@]}" inject examples/notes --pool demo
memcli "${options[@]}" ask "When does the flight to Lisbon leave?" --pool demo "${ask[@]}"
memcli "${options[@]}" pool info demo
