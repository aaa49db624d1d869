"""How many CPU threads memcli computes with: chosen by the work, at model load (`configure`, from
`loading.build_model`), and applied in every thread that computes (`ensure`, from the engine's
entry points: libgomp and MKL keep the count per thread).

torch's default is one thread per core, whatever the model. For memcli-tiny (matrices of a few
KB) that is a loss everywhere and a disaster on a busy machine: every matrix product becomes an
OpenMP parallel region whose threads must all meet at its end, so a thread that the kernel has
descheduled (the other core is busy) stalls the step for a scheduler slice while its partner
spins. Measured on the 2-core development VM (`benchmarks/bench_threads.py`): a 556-chunk inject
took 105.8 s with two threads on two busy cores against 2.8 s with one.

The rule (`choose`):
  1. `MEMCLI_THREADS`, then `OMP_NUM_THREADS`, then the config key `threads` win when set.
  2. Otherwise one thread per `PER_THREAD_FLOPS` of the model's largest matrix product in one
     chunk's forward (`largest_product_flops`), at least 1, at most the CPUs this process may run
     on (`os.sched_getaffinity`, one per physical core, within a cgroup CPU quota).

Why `PER_THREAD_FLOPS` = 8 MFLOP: a parallel region costs each extra thread a wake-up and a join,
~15-20 us on an idle machine with passive waiting (measured: a 20x64x256 product takes 9 us on one
thread and 25 us on two), and a core does ~100 GFLOP/s of fp32 products (AVX2, measured: a
512x1024x3584 product in 36 ms). A thread's share of a product must take several times that
overhead for the split to pay: 4 x 20 us x 100 GFLOP/s = 8 MFLOP. memcli-tiny's largest product
per chunk is 2 x 20 rows x 64 x 256 = 0.66 MFLOP (one thread; the conformance fixtures likewise);
a width-1024 model's is 3.8 GFLOP and the 8B models' 60 GFLOP (every core).

Idle threads must not spin: `memcli/__init__` sets `OMP_WAIT_POLICY=PASSIVE` (unless the user set
it) before torch loads libgomp, which reads it once at load. Measured with torch 2.13's CPU build
(libgomp): with one CPU burner beside it, two threads of memcli-tiny took 11.8 ms per chunk
spinning and 1.1 ms passive (0.65 ms with one thread); on the medium model with two burners an
inject chunk took 8.6 s spinning, 2.0 s passive. `GOMP_SPINCOUNT=0` does the same; `KMP_BLOCKTIME`
is Intel OpenMP's and changes nothing here. Inter-op threads are idle workers that block, not spin.

Torch-free until `configure` runs (settings and light commands import this module's constants).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Mapping

PER_THREAD_FLOPS = 8_000_000
CHUNK_ROWS = 512  # memcli's default chunk (api.DEFAULT_CHUNK_TOKENS), or the model's window if shorter
MAX_THREADS = 1024


@dataclass(frozen=True)
class Choice:
    threads: int
    source: str  # "MEMCLI_THREADS" | "OMP_NUM_THREADS" | "config" | "auto"
    why: str


def largest_product_flops(cfg) -> int:
    """FLOPs of the largest matrix product of one injected chunk's forward: the MLP's (or the query
    projection's, if wider) over the chunk's rows."""
    rows = min(cfg.window or CHUNK_ROWS, CHUNK_ROWS)
    width = max(cfg.intermediate_size, cfg.num_heads * cfg.head_dim)
    return 2 * rows * cfg.hidden_size * width


def parse_count(value, what: str) -> int | None:
    """A thread count: a whole number 1..1024, or None for "auto"/unset. Anything else is a
    ValueError naming `what`."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in ("", "auto"):
        return None
    if not text.isdigit() or not 1 <= int(text) <= MAX_THREADS:
        raise ValueError(f"{what} must be auto or a whole number from 1 to {MAX_THREADS}, not {value!r}")
    return int(text)


def _omp_count(value: str | None) -> int | None:
    """OMP_NUM_THREADS as OpenMP reads it (a list for nested levels: the first); None if unusable
    (OpenMP ignores it then too)."""
    if not value:
        return None
    first = value.split(",")[0].strip()
    return int(first) if first.isdigit() and int(first) >= 1 else None


def choose(flops: int, cpus: int, env: Mapping[str, str], configured=None) -> Choice:
    """The thread count for a model whose largest product is `flops`, on `cpus` usable cores."""
    explicit = parse_count(env.get("MEMCLI_THREADS"), "MEMCLI_THREADS")
    if explicit is not None:
        return Choice(explicit, "MEMCLI_THREADS", "set by MEMCLI_THREADS")
    omp = _omp_count(env.get("OMP_NUM_THREADS"))
    if omp is not None:
        return Choice(omp, "OMP_NUM_THREADS", "set by OMP_NUM_THREADS")
    configured = parse_count(configured, "threads")
    if configured is not None:
        return Choice(configured, "config", "set by the config key threads")
    cpus = max(1, cpus)
    by_work = max(1, flops // PER_THREAD_FLOPS)
    n = min(cpus, by_work)
    why = (f"largest product {flops / 1e6:.1f} MFLOP per chunk: one thread per {PER_THREAD_FLOPS // 10**6} MFLOP, "
           f"{cpus} usable core(s)")
    return Choice(n, "auto", why)


def usable_cpus() -> int:
    """Cores this process may compute on: the CPUs of its affinity mask, hyper-thread siblings
    counted once (they share one core's arithmetic units), within a cgroup v2 CPU quota."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(cpu))
    n = max(1, len(cores))
    quota = _cgroup_quota()
    return min(n, quota) if quota else n


def _cgroup_quota() -> int | None:
    """The cgroup v2 CPU quota of this process in whole CPUs (rounded up); None when unlimited."""
    try:
        with open("/proc/self/cgroup") as f:
            path = next((line.strip()[3:] for line in f if line.startswith("0::")), None)
        if path is None:
            return None
        with open(os.path.join("/sys/fs/cgroup", path.lstrip("/"), "cpu.max")) as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError, StopIteration):
        return None
    if quota == "max":
        return None
    try:
        return max(1, -(-int(quota) // int(period)))
    except (ValueError, ZeroDivisionError):
        return None


_applied: Choice | None = None
_generation = 0  # bumped whenever the process's choice changes
_here = threading.local()  # the generation applied in each thread


def configure(cfg, configured=None) -> Choice:
    """Choose the compute threads for a model being loaded (called once per load, by
    `loading.build_model`) and apply them in this thread; `ensure` applies them in any other. A
    process holding several models computes with what the largest of them chose: loading a small
    model after a large one does not slow the large one down."""
    global _applied, _generation

    choice = choose(largest_product_flops(cfg), usable_cpus(), os.environ, configured)
    if choice.source == "auto" and _applied is not None and _applied.source == "auto" and _applied.threads > choice.threads:
        choice = _applied
    if choice != _applied:
        _applied, _generation = choice, _generation + 1
    _apply_here()
    return choice


def ensure() -> None:
    """Apply the process's choice in the calling thread, once per thread and choice (the engine
    calls this on every entry). libgomp and MKL keep the thread count per thread: a thread that
    computed before `torch.set_num_threads` ran elsewhere keeps torch's default (measured: a
    server's request threads stayed on two while the thread that loaded the model had one, and
    their answers differed in the last bits from a one-thread process's)."""
    if _applied is not None and getattr(_here, "generation", None) != _generation:
        _apply_here()


def _apply_here() -> None:
    import torch

    if torch.get_num_threads() != _applied.threads:  # this thread's count
        torch.set_num_threads(_applied.threads)
    _here.generation = _generation


def applied() -> Choice | None:
    """What the last `configure` chose (None before any model loaded in this process)."""
    return _applied
