"""memcli: a local language model with a persistent, self-updating memory (MemoryLLM / M+)."""

import os as _os

# The one place of the version (pyproject.toml reads it from here; pools record it: pool info "written by").
__version__ = "0.2.0"

# The same question must get the same answer from a server and from a one-shot command. MKL (the
# CPU BLAS of torch's x86 builds) by default picks kernels by the inputs' memory alignment, so two
# processes can sum a one-row product in another order and, on a near tie, pick another token.
# Conditional numerical reproducibility fixes the code path (measured ~10% on decode-sized CPU
# products; nothing on a GPU). MKL reads it at its first call; a value the user set wins.
_os.environ.setdefault("MKL_CBWR", "AUTO")

# Idle OpenMP threads wait passively (sleep) instead of spinning: on a busy machine a spinning
# thread burns the time slice the thread it waits for needs (memcli/core/threads.py has the figures).
# libgomp reads this once, when torch loads it, so it is set here, before anything imports torch.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
