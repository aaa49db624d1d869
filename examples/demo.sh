#!/usr/bin/env bash
# memcli demo: inject notes into a pool, ask about them.
#   bash examples/demo.sh              the real model (memoryllm-8b-chat) when a CUDA GPU is here and the
#                                      checkpoint is downloaded; with no GPU, the offline demo; with a GPU
#                                      but no checkpoint, says how to get it (nothing is installed first)
#   bash examples/demo.sh --offline    offline demo: memcli-tiny on the CPU, nothing downloaded
#   bash examples/demo.sh --download   the real model, downloading it first (~39 GB once, 12 GB GPU for 4-bit)
#   bash examples/demo.sh --smoke      plumbing check on the tiny random checkpoint (its answers are noise)
#   add --no-install to use the current Python environment instead of creating .venv
# The pools stay in memcli's data folder (MEMCLI_HOME when set): demo-tiny (offline), demo (real model),
# so you can carry on from them; the smoke test's noise goes to a temporary folder that is removed.
# A memcli server the demo starts is stopped when it ends (one you were already running is left alone).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=auto
install=1
for arg in "$@"; do
  case "$arg" in
    --offline) mode=offline ;;
    --download) mode=download ;;
    --smoke) mode=smoke ;;
    --no-install) install=0 ;;
    -h|--help) sed -n '2,12p' "$0" | cut -c3-; exit 0 ;;
    *) echo "demo.sh: unknown option $arg (try --help)" >&2; exit 2 ;;
  esac
done

# Decide before installing anything: the real model's environment is gigabytes.
has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "GPU"; }
hub="${HF_HUB_CACHE:-${HF_HOME:-$HOME/.cache/huggingface}/hub}"
has_checkpoint() { compgen -G "$hub/models--YuWangX--memoryllm-8b-chat/snapshots/*/config.json" >/dev/null; }
if [ "$mode" = auto ]; then
  if ! has_gpu; then
    echo "No CUDA GPU here. The real models (memoryllm-8b-chat, 8 billion parameters) need a CUDA GPU" >&2
    echo "with 12 GB or more and a one-time download of about 39 GB." >&2
    echo "Running the offline demo instead (bash examples/demo.sh --offline)." >&2
    mode=offline
  elif ! has_checkpoint; then
    echo "A GPU is here, but memoryllm-8b-chat is not downloaded (about 39 GB; looked in $hub)." >&2
    echo "  bash examples/demo.sh --download   download it, then run the real demo" >&2
    echo "  bash examples/demo.sh --offline    the offline demo: memcli-tiny on the CPU, no download" >&2
    exit 2
  else
    mode=real
  fi
fi
if [ "$mode" = download ] && ! has_gpu; then
  echo "No CUDA GPU here: the real model cannot run on this machine. Try bash examples/demo.sh --offline" >&2
  exit 2
fi

if [ "$install" = 1 ]; then
  python3 -m venv .venv
  . .venv/bin/activate
  if ! has_gpu; then
    # the CPU build of torch is a few hundred MB instead of several GB of CUDA libraries; the same
    # torch as the test command (MEMCLI_TORCH overrides), from PyTorch's CPU index where it is reachable
    python -m pip install -q --retries 0 --timeout 15 --extra-index-url https://download.pytorch.org/whl/cpu \
      "${MEMCLI_TORCH:-torch==2.13.0}"
  fi
  python -m pip install -q -e .
  run() { memcli "$@"; }
  memcli_cmd=memcli
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  run() { python -m memcli "$@"; }
  memcli_cmd="python -m memcli"
fi

# The smoke test's pool is noise: it lives in a temporary home, removed at the end. The other demos
# keep their pool where memcli keeps pools, to carry on from.
scratch=""
if [ "$mode" = smoke ]; then
  scratch="$(mktemp -d)"
  export MEMCLI_HOME="$scratch"
fi
# A server the demo's commands start (ask and inject start one) is stopped when the demo ends, however
# it ends; a server that was running before is the user's and stays.
server_pid() {  # the running server's pid (memcli ps --json), or nothing
  run ps --json 2>/dev/null | sed -n 's/^  "pid": \([0-9][0-9]*\),*$/\1/p' || true
}
server_before="$(server_pid)"
finish() {
  local pid
  pid="$(server_pid)"
  if [ -z "$server_before" ] && [ -n "$pid" ]; then
    run stop >/dev/null 2>&1 || true
    for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done  # until it has exited
  fi
  if [ -n "$scratch" ]; then rm -rf "$scratch"; fi
}
trap finish EXIT
trap 'exit 130' INT TERM

carry_on() {  # how to go on from the demo's pool: $1 the pool, $2 a question (the pool knows its model)
  echo
  echo "The pool $1 stays (memcli pool info $1). Carry on from it:"
  echo "  $memcli_cmd ask '$2' --pool $1"
  echo "  $memcli_cmd inject YOUR-NOTES.txt --pool $1"
  echo "Remove it: $memcli_cmd pool rm $1 --yes"
  if [ "$install" = 1 ]; then
    echo "memcli is installed in $PWD/.venv: in a new shell, first run  . $PWD/.venv/bin/activate"
  fi
}

if [ "$mode" = offline ]; then
  export HF_HUB_OFFLINE=1
  opts=(--model memcli-tiny --device cpu)
  note=examples/notes-tiny/people.txt
  cat <<EOF
== Offline demo: memcli-tiny ==
memcli-tiny is a toy: a 2-layer MemoryLLM (0.2 M parameters) trained here on synthetic facts about
invented people (training/). It is not a language model; it can only answer questions shaped like
the ones below. It runs the same loader, memory and engine as the real models, which need a CUDA GPU
and a download (bash examples/demo.sh --download).

The note it reads ($note):
EOF
  sed 's/^/  /' "$note"
  run "${opts[@]}" inject "$note" --pool demo-tiny
  right=0
  total=0
  while IFS='|' read -r question expected; do
    answer=$(run "${opts[@]}" ask "$question" --pool demo-tiny)
    verdict="wrong"
    case "$answer" in *"$expected"*) verdict="right"; right=$((right + 1)) ;; esac
    total=$((total + 1))
    printf '  %-26s %-10s (%s; the note says %s)\n' "$question" "$answer" "$verdict" "$expected"
  done <<'EOF'
Where does Kai live?|Turin
Where does Mia work?|Solvay
What does Ivo own?|jukebox
What does Zoe play?|cricket
Where does Lars live?|Galway
What does Nia own?|violin
Where does Oto work?|Acorn
What does Pia play?|drums
EOF
  echo "$right of $total answered right from memory."
  echo "Which notes the first question read most (--sources):"
  run "${opts[@]}" ask "Where does Kai live?" --pool demo-tiny --sources | sed 's/^/  /'
  carry_on demo-tiny "Where does Mia work?"
  exit 0
fi

options=()
ask=(--max-new-tokens 64)
if [ "$mode" = smoke ]; then
  export HF_HUB_OFFLINE=1
  options=(--model examples/tiny-model --device cpu)
  ask=(--max-new-tokens 12)
  echo "smoke test: tiny random model, data in a temporary folder removed at the end (its answers are noise)" >&2
fi
run "${options[@]}" inject examples/notes --pool demo
run "${options[@]}" ask "When does the flight to Lisbon leave?" --pool demo "${ask[@]}"
run "${options[@]}" pool info demo
if [ "$mode" != smoke ]; then
  carry_on demo "When does the flight to Lisbon leave?"
fi
