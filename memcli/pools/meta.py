"""A pool's metadata without its memory: binding, injection log, listing, info, retention; and
`PoolStore`, the store of memcli's pools (the generic store given these checks of their meta).

Pure Python (no torch import): `memcli pool ls` and `memcli pool info` use only this and the
store, and read only small things: manifests, the log and the state's census part (distinct row
origins and their counts); pools saved before the census existed have their per-row origin
tables counted instead. Never the memory rows themselves.

Pool meta in a manifest (every field checked by `check_meta` before use)::

    "model": {"model", "family", "config_hash", "num_tokens", "revision"}   the Binding
    "next_chunk": int        provenance serial of the next injected chunk
    "state": {...}           which parts hold what (pool.py)
    "totals": {"sources", "chunks", "tokens"}   for pool ls without reading the log
    "sources": [...]         format-1 pools only: the log inside the manifest (read as records)

The injection log is the store's append-only pool log: records {"source": index, "entry": {...}},
the latest record of an index wins; each save appends the entries that changed.
"""

from __future__ import annotations

import bisect
import struct
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from memcli.base.clock import iso_z
from memcli.store import MetaChecks, PoolCorrupt, PoolError
from memcli.store import PoolStore as Store
from memcli.store.manifest import SHA_RE, is_int

MAX_SOURCES = 1_000_000


class PoolModelMismatch(PoolError):
    """A pool asked for with a model it does not belong to (exit 1, HTTP 409, as every PoolError)."""


@dataclass(frozen=True)
class Binding:
    """Which model a pool belongs to. Pools can only be read by a model with the same config."""

    model: str  # what the user named: alias, hub id or folder
    family: str
    config_hash: str
    num_tokens: int = 0  # rows each injected chunk writes per layer (for retention figures)
    revision: str | None = None
    # earlier config fingerprints of the same model (the raw-config hash of memcli 0.1), accepted
    # from existing pools; never written
    legacy_hashes: tuple[str, ...] = field(default=(), compare=False)

    def to_json(self) -> dict:
        return {"model": self.model, "family": self.family, "config_hash": self.config_hash,
                "num_tokens": self.num_tokens, "revision": self.revision}

    @staticmethod
    def from_json(data: dict) -> "Binding":
        return Binding(data["model"], data["family"], data["config_hash"], int(data.get("num_tokens") or 0),
                       data.get("revision"))


# ------------------------------------------------------------------------ checking


def _bad(what: str, field: str, expected: str) -> PoolCorrupt:
    return PoolCorrupt(f"{what}: manifest.json field {field} is invalid ({expected} is expected)")


def check_source(what: str, where: str, s) -> None:
    if not isinstance(s, dict):
        raise _bad(what, where, "an object")
    for key in ("chunks", "tokens", "first_chunk", "bytes", "id", "rows"):
        if key in s and not (is_int(s[key]) or (key == "bytes" and s[key] is None)):
            raise _bad(what, f"{where}.{key}", "an integer >= 0")
    for key in ("path", "kind", "time"):
        if key in s and not isinstance(s[key], (str, type(None))):
            raise _bad(what, f"{where}.{key}", "a string")
    if "sha256" in s and not (isinstance(s["sha256"], str) and SHA_RE.fullmatch(s["sha256"])):
        raise _bad(what, f"{where}.sha256", "a sha256 hex digest")
    if "complete" in s and not isinstance(s["complete"], bool):
        raise _bad(what, f"{where}.complete", "true or false")
    if "packed" in s and (not isinstance(s["packed"], list) or not all(is_int(k) for k in s["packed"])):
        raise _bad(what, f"{where}.packed", "a list of integers")


def check_meta(what: str, meta: dict, records: list[dict] | None = None) -> None:
    """Check the fields of a pool's meta (and, given, its log records); PoolCorrupt naming the
    field otherwise."""
    model = meta.get("model")
    if not isinstance(model, dict):
        raise _bad(what, "meta.model", "an object")
    for key in ("model", "family", "config_hash"):
        if not isinstance(model.get(key), str) or not model[key] or len(model[key]) > 4096:
            raise _bad(what, f"meta.model.{key}", "a non-empty string")
    if not is_int(model.get("num_tokens", 0) or 0) or not isinstance(model.get("revision"), (str, type(None))):
        raise _bad(what, "meta.model.num_tokens/revision", "an integer and a string or null")
    if not is_int(meta.get("next_chunk", 0)):
        raise _bad(what, "meta.next_chunk", "an integer >= 0")
    state = meta.get("state")
    if not isinstance(state, dict):
        raise _bad(what, "meta.state", "an object")
    shape = state.get("shape")
    if not isinstance(shape, list) or len(shape) != 3 or not all(is_int(d, 1, 1 << 24) for d in shape):
        raise _bad(what, "meta.state.shape", "three positive integers")
    for key in ("stm_base", "stm_meta"):
        if not isinstance(state.get(key), str):
            raise _bad(what, f"meta.state.{key}", "a part id")
    for key in ("stm_gen", "census", "ltm_index"):
        if key in state and not isinstance(state[key], str):
            raise _bad(what, f"meta.state.{key}", "a part id")
    for key in ("stm_patches", "ltm_banks"):
        if not isinstance(state.get(key, []), list) or not all(isinstance(p, str) for p in state.get(key, [])):
            raise _bad(what, f"meta.state.{key}", "a list of part ids")
    if not isinstance(state.get("stm_patch_rows", []), list) or not all(is_int(r) for r in state.get("stm_patch_rows", [])):
        raise _bad(what, "meta.state.stm_patch_rows", "a list of integers")
    for key in ("update_count", "ltm_saved_size", "ltm_epoch"):
        if key in state and not is_int(state[key]):
            raise _bad(what, f"meta.state.{key}", "an integer >= 0")
    if "ltm" in state and (not isinstance(state["ltm"], dict)
                           or not all(is_int(state["ltm"].get(k)) for k in ("cache_start", "update_step", "size"))):
        raise _bad(what, "meta.state.ltm", "{cache_start, update_step, size} integers")
    for key in ("created_by", "written_by"):  # memcli versions (pools before 0.2.0 have none)
        if not isinstance(meta.get(key), (str, type(None))) or len(meta.get(key) or "") > 64:
            raise _bad(what, f"meta.{key}", "a version string")
    totals = meta.get("totals")
    if totals is not None and (not isinstance(totals, dict)
                               or not all(is_int(totals.get(k)) for k in ("sources", "chunks", "tokens"))):
        raise _bad(what, "meta.totals", "{sources, chunks, tokens} integers")
    sources = meta.get("sources", [])
    if not isinstance(sources, list) or len(sources) > MAX_SOURCES:
        raise _bad(what, "meta.sources", "a list")
    for i, s in enumerate(sources):
        check_source(what, f"meta.sources[{i}]", s)
    count = len(sources)
    for n, rec in enumerate(records or [], 1):
        index = rec.get("source")
        if not is_int(index, 0, count) or not isinstance(rec.get("entry"), dict):
            raise PoolCorrupt(f"{what}: log.jsonl record {n} is invalid (source index and entry are expected)")
        check_source(what, f"log.jsonl record {n} entry", rec["entry"])
        count = max(count, index + 1)


def max_part_bytes(meta: dict) -> int:
    """An upper bound on any part of a pool with this meta: far above what a real part needs
    (its memory at 8 bytes a value, 16 times over), far below what a bomb claims."""
    L, n, d = meta["state"]["shape"]
    return 16 * L * n * (d + 8) * 8 + (64 << 20)


class PoolStore(Store):
    """The store of memcli's pools: the generic store (memcli.store), which checks the meta of a
    pool it did not write itself (an import, a fork, an export) with `check_meta` and bounds its
    parts with `max_part_bytes`. Every command, the library and the server make this one."""

    def __init__(self, root: Path | None = None):
        super().__init__(root, checks=POOL_CHECKS)


POOL_CHECKS = MetaChecks(check_meta, max_part_bytes)


# ------------------------------------------------------------------------ the log


def sources_of(meta: dict, records: list[dict]) -> list[dict]:
    """The injection log: a format-1 manifest's own list, then the log records applied."""
    sources = [dict(s) for s in meta.get("sources", [])]
    for rec in records:
        i = rec["source"]
        if i == len(sources):
            sources.append(rec["entry"])
        else:
            sources[i] = rec["entry"]
    return sources


def totals_of(sources: list[dict]) -> dict:
    """Sources, chunks and tokens of a log; a chunk packed from several short texts counts once."""
    packed = {k for s in sources for k in s.get("packed", ())}
    return {"sources": len(sources),
            "chunks": sum(int(s.get("chunks", 0)) for s in sources if "packed" not in s) + len(packed),
            "tokens": sum(int(s.get("tokens", 0)) for s in sources)}


def read_binding(store: PoolStore, name: str) -> Binding:
    meta = store.read_manifest(name)["meta"]
    check_meta(f"pool {name}", meta)
    return Binding.from_json(meta["model"])


def check_binding(name: str, pool_binding: Binding, model_binding: Binding) -> None:
    known = (model_binding.config_hash, *model_binding.legacy_hashes)
    if pool_binding.config_hash not in known or pool_binding.family != model_binding.family:
        raise PoolModelMismatch(
            f"pool {name} belongs to model {pool_binding.model} ({pool_binding.family}, config "
            f"{pool_binding.config_hash}), not to {model_binding.model} ({model_binding.family}, config "
            f"{model_binding.config_hash})"
        )


# ------------------------------------------------------------------------ ls / info


def list_rows(store: PoolStore) -> list[dict]:
    """One row per pool (sorted by name), from manifests only; a damaged pool gets `error`."""
    rows = []
    for info in store.list():
        row = {"name": info.name, "model": None, "bytes_on_disk": info.bytes_on_disk, "sources": 0, "chunks": 0,
               "tokens": 0, "created": iso_z(info.created), "updated": iso_z(info.updated), "error": info.error}
        if info.error is None:
            try:
                check_meta(f"pool {info.name}", info.meta)
                totals = info.meta.get("totals") or totals_of(info.meta.get("sources", []))
                row.update(model=info.meta["model"]["model"], **totals)
            except PoolError as exc:
                row.update(error=str(exc), bytes_on_disk=0, created=None, updated=None)
        rows.append(row)
    return rows


def _small_parts(manifest: dict) -> list[str]:
    """The parts pool info reads: the census, or (pools saved before it) the origin tables."""
    parts, layout = manifest["parts"], manifest["meta"].get("state")
    if not isinstance(layout, dict):
        return []
    if layout.get("census") in parts:
        return [layout["census"]]
    wanted = [layout.get("stm_meta"), *(layout.get("ltm_banks") or [])]
    if "ltm" in layout and layout.get("ltm_index"):
        wanted.append(layout["ltm_index"])
    return [p for p in wanted if isinstance(p, str) and p in parts]


def pool_info(store: PoolStore, name: str) -> dict:
    """Manifest facts plus, per source, how much of it is still in memory (small tables only).
    `damaged`: what is wrong with its parts as far as can be told without reading them (missing,
    wrong size, not a regular file, found damaged before: store.part_problems), one line each."""
    info = store.info(name)  # its size; every other fact comes from the one snapshot below
    with store.snapshot(name, part_ids=_small_parts) as snap:
        m = snap.manifest
        meta = m["meta"]
        records = snap.log_records()
        check_meta(f"pool {name}", meta, records)
        sources = sources_of(meta, records)
        result = {
            "name": info.name, "model": meta["model"]["model"], "family": meta["model"]["family"],
            "version": m["version"], "created": iso_z(m["created"]), "updated": iso_z(m["updated"]),
            "bytes_on_disk": info.bytes_on_disk, "sources": sources, **{k: v for k, v in totals_of(sources).items()
                                                                        if k != "sources"},
            # the memcli versions that created the pool and last saved its memory (None: before 0.2.0)
            "created_by": meta.get("created_by"), "written_by": meta.get("written_by"),
            # the memory's size in the units retention counts in (its rows are over all layers)
            "memory": {"layers": meta["state"]["shape"][0], "rows_per_layer": meta["state"]["shape"][1]},
            "damaged": store.part_problems(name, m),
        }
        if sources:
            binding = Binding.from_json(meta["model"])
            if meta["state"].get("census") in snap.manifest["parts"]:
                result["retention"] = retention_from_census(snap, binding, sources)
            else:  # pools saved before the census existed: count the origin tables
                result["retention"] = retention_from_tables(snap, binding, sources)
    return result


def info_json(store: PoolStore, name: str) -> dict:
    """`pool_info` as memcli shows it (`memcli pool info --json`, `Memcli.pool_info`): `sources` a
    count, `files` the log entries with times in the one format, `retention` always a list."""
    info = pool_info(store, name)
    files = [{**entry, "time": iso_z(entry.get("time"))} for entry in info["sources"]]
    return {**info, "sources": len(files), "files": files, "retention": info.get("retention", [])}


# ------------------------------------------------------------------------ retention


def _int64s(snap, part_id: str, tensor: str) -> tuple[array, list[int]]:
    dtype, shape, data = snap.read_raw(part_id, tensor)
    if dtype != "I64":
        raise PoolCorrupt(f"pool {snap.name}: {tensor} of part {part_id} is {dtype}, not I64")
    values = array("q")
    values.frombytes(data)
    if struct.pack("=H", 1) != struct.pack("<H", 1):  # pragma: no cover - big-endian host
        values.byteswap()
    return values, shape


def _report(sources, binding, L, in_stm, in_ltm) -> list[dict]:
    """Per source: the rows it wrote and how many are still in memory. A source's rows carry its
    provenance serials [first_chunk, first_chunk + chunks); it wrote `rows` per layer where the log
    says (a text packed with others: its share of its chunks' rows; a source whose last chunk lent
    context to a packed one: that share too), else `num_tokens` per chunk."""
    report = []
    for source in sources:
        first, count = source.get("first_chunk", 0), source.get("chunks", 0)
        written = int(source.get("rows", count * binding.num_tokens)) * L
        stm, ltm = in_stm(first, first + count), in_ltm(first, first + count)
        packed = source.get("packed")
        report.append({
            "source": source.get("path"), "sha256": source.get("sha256"),
            "chunks": len(set(packed)) if packed is not None else count,
            "rows_written": written, "rows_in_stm": stm, "rows_in_ltm": ltm,
            "share_retained": (stm + ltm) / written if written else 0.0,
            # packed: the chunks it shares with other short texts (their first serials), else absent
            **({"packed": sorted(set(packed))} if packed is not None else {}),
        })
    return report


def retention_from_census(snap, binding: Binding, sources: list[dict]) -> list[dict]:
    """Retention from the census part (distinct origins + counts): a few KB whatever the pool's size."""
    layout = snap.manifest["meta"]["state"]
    part = layout["census"]

    def counter(kind: str):
        origins, _ = _int64s(snap, part, f"{kind}_origin")
        counts, _ = _int64s(snap, part, f"{kind}_count")
        if len(origins) != len(counts) or any(b <= a for a, b in zip(origins, origins[1:])):
            raise PoolCorrupt(f"pool {snap.name}: its census part is damaged")
        prefix = [0]
        for c in counts:
            prefix.append(prefix[-1] + c)
        return lambda lo, hi: prefix[bisect.bisect_left(origins, hi)] - prefix[bisect.bisect_left(origins, lo)]

    return _report(sources, binding, layout["shape"][0], counter("stm"), counter("ltm"))


def retention_from_tables(snap, binding: Binding, sources: list[dict]) -> list[dict]:
    """Per source: how many of the rows it wrote are still in memory, and where (STM / LTM).

    Every injected chunk writes `num_tokens` rows in every layer; each row carries the serial
    of the chunk that wrote it (the origin tables), so this is a count, not an estimate."""
    layout = snap.manifest["meta"]["state"]
    L = layout["shape"][0]
    stm, _ = _int64s(snap, layout["stm_meta"], "origin")
    stm_sorted = sorted(stm)
    ltm_sorted: list[int] = []
    if "ltm" in layout and layout.get("ltm_index"):
        ids, _ = _int64s(snap, layout["ltm_index"], "ids")
        lengths, _ = _int64s(snap, layout["ltm_index"], "lengths")
        banks = []
        for bank in layout.get("ltm_banks", []):
            values, shape = _int64s(snap, bank, "origin")
            banks.append((values, shape[1]))
        width = sum(m for _, m in banks)
        info = layout["ltm"]
        cache = range(info["cache_start"], info["size"])
        start = 0
        for layer in range(L):
            row = array("q")
            for values, m in banks:
                row.extend(values[layer * m:(layer + 1) * m])
            layer_ids = list(ids[start:start + lengths[layer]]) + list(cache)
            start += lengths[layer]
            if any(i < 0 or i >= width for i in layer_ids):
                raise PoolCorrupt(f"pool {snap.name}: its long-term memory index points outside the bank")
            ltm_sorted.extend(row[i] for i in layer_ids)
        ltm_sorted.sort()

    def within(values: list[int]):
        return lambda lo, hi: bisect.bisect_left(values, hi) - bisect.bisect_left(values, lo)

    return _report(sources, binding, L, within(stm_sorted), within(ltm_sorted))
