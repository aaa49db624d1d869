"""Safetensors files, streamed both ways, with a header parser that trusts nothing.

Shared by the pool store and the converted-weights cache (memcli/loading/converted.py). Importing this
module does not import torch: the header parser and raw reads are pure Python (pool metadata
and archive checks use them); only writing and reading tensors import torch, when called.

Format: 8-byte little-endian header length n, n bytes of JSON header
{name: {"dtype", "shape", "data_offsets": [start, end]}, "__metadata__": {str: str}}, then the
data; offsets are relative to the data and tile it exactly.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from typing import Any, Iterator

from memcli.base.durable import CHUNK
from memcli.base.errors import Damaged

from .errors import PoolError

# safetensors dtype code -> bytes per element
ITEM_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "C64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
    "U16": 2, "U32": 4, "U64": 8,
}
MAX_HEADER_BYTES = 16 << 20
MAX_TENSORS = 4096
MAX_DIMS = 8


class HeaderError(Damaged, ValueError):
    """A safetensors header that is malformed or out of bounds; str() is the reason (callers name
    the file: a part is PoolCorrupt, a checkpoint shard a CheckpointError)."""


def parse_header(read_at, size: int) -> tuple[dict[str, dict], int]:
    """Parse and bound-check the header of a safetensors file of `size` bytes.

    `read_at(offset, n)` returns bytes. Returns ({name: {"dtype", "shape", "start", "end"}},
    data_start). Checks: header length within the file and under 16 MiB, a JSON object of at
    most 4096 tensors, known dtypes, shapes of at most 8 non-negative ints, shape x dtype size
    = data size, and offsets that tile the data exactly (no gap, overlap or trailing bytes)."""
    if size < 8:
        raise HeaderError("too short for a safetensors file")
    (n,) = struct.unpack("<Q", read_at(0, 8))
    if n < 2 or n > min(size - 8, MAX_HEADER_BYTES):
        raise HeaderError(f"header length {n} out of range")
    raw = read_at(8, n)
    if len(raw) != n:
        raise HeaderError("file ends inside the header")
    try:  # json.loads, not base.jsonbound: a header is read for every part a load or pool info opens,
        # and the bounded parser's depth scan costs ~6x its parse; a RecursionError is caught instead
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise HeaderError("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise HeaderError("header is not a JSON object")
    if len(header) > MAX_TENSORS + 1:
        raise HeaderError(f"header lists {len(header)} tensors (at most {MAX_TENSORS})")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise HeaderError("__metadata__ is not a string map")
    data_size = size - 8 - n
    tensors: dict[str, dict] = {}
    for name, entry in header.items():
        shown = repr(name)[:40]
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise HeaderError(f"tensor {shown}: entry is not {{dtype, shape, data_offsets}}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in ITEM_BYTES:
            raise HeaderError(f"tensor {shown}: unknown dtype {str(dtype)[:20]!r}")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(type(d) is int and 0 <= d < 1 << 40 for d in shape)):
            raise HeaderError(f"tensor {shown}: invalid shape")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int and 0 <= o <= data_size for o in offsets) or offsets[0] > offsets[1]):
            raise HeaderError(f"tensor {shown}: data offsets outside the file")
        count = 1
        for d in shape:
            count *= d
        if count * ITEM_BYTES[dtype] != offsets[1] - offsets[0]:
            raise HeaderError(f"tensor {shown}: shape x dtype size does not match its data size")
        tensors[name] = {"dtype": dtype, "shape": shape, "start": offsets[0], "end": offsets[1]}
    end = 0
    for entry in sorted(tensors.values(), key=lambda e: (e["start"], e["end"])):
        if entry["start"] != end:
            raise HeaderError("tensor data overlaps or leaves a gap")
        end = entry["end"]
    if end != data_size:
        raise HeaderError("data size does not match the file size")
    return tensors, 8 + n


def fd_reader(fd: int):
    return lambda offset, n: os.pread(fd, n, offset)


def read_raw(fd: int, size: int, name: str) -> tuple[str, list[int], bytes]:
    """One tensor's dtype code, shape and little-endian bytes, without torch."""
    tensors, data_start = parse_header(fd_reader(fd), size)
    if name not in tensors:
        raise HeaderError(f"no tensor {name!r}")
    e = tensors[name]
    data = _pread_exact(fd, e["end"] - e["start"], data_start + e["start"])
    return e["dtype"], e["shape"], data


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    parts, got = [], 0
    while got < n:
        data = os.pread(fd, min(CHUNK, n - got), offset + got)
        if not data:
            raise HeaderError("file ends inside tensor data")
        parts.append(data)
        got += len(data)
    return b"".join(parts)


# ---------------------------------------------------------------- torch side (lazy)


def _torch_dtypes() -> dict:
    import torch

    table = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL", torch.complex64: "C64"}
    for attr, code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
                       ("float8_e5m2fnuz", "F8_E5M2FNUZ"), ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
        if hasattr(torch, attr):
            table[getattr(torch, attr)] = code
    return table


def check_tensors(what: str, tensors: Any) -> None:
    """Refuse anything safetensors_chunks cannot write, with a one-line reason."""
    import torch

    codes = _torch_dtypes()
    if not isinstance(tensors, dict):
        raise PoolError(f"{what}: expected a dict of name -> tensor, got {type(tensors).__name__}")
    for key, value in tensors.items():
        if not isinstance(key, str) or not key or key == "__metadata__":
            raise PoolError(f"{what}: invalid tensor name {key!r:.60}")
        if not isinstance(value, torch.Tensor):
            raise PoolError(f"{what}: {key!r:.60} is a {type(value).__name__}, not a tensor")
        if value.layout != torch.strided:
            raise PoolError(f"{what}: tensor {key!r:.60} is not dense ({value.layout})")
        if value.dtype not in codes:
            raise PoolError(f"{what}: tensor {key!r:.60} has unsupported dtype {value.dtype}")


def safetensors_chunks(tensors: dict) -> Iterator[memoryview | bytes]:
    """Yield the bytes of a safetensors file for `tensors`, tensor by tensor, without
    building the whole file in memory (a 3 GB part must not need 3 GB more RAM)."""
    if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian
        from safetensors.torch import save

        yield save(tensors)
        return
    codes = _torch_dtypes()
    # Same layout as safetensors itself: widest dtypes first so that every tensor is
    # aligned, header padded with spaces to a multiple of 8.
    order = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, t in order:
        n = t.numel() * t.element_size()
        header[key] = {"dtype": codes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    yield struct.pack("<Q", len(head)) + head
    for _key, t in order:
        if t.numel() == 0:
            continue
        flat = t.detach().to("cpu").resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch_uint8())
        view = memoryview(flat.numpy())
        for start in range(0, len(view), CHUNK):
            yield view[start : start + CHUNK]


def torch_uint8():
    import torch

    return torch.uint8


def read_tensors(fd: int, size: int, names=None, digest=None) -> dict:
    """The tensors of an open safetensors file (or only `names`), read with pread straight
    into their own memory: no path is needed, so a file unlinked after it was opened still
    reads, and the bytes read are exactly those of the file that was checked.

    digest: a hash object (memcli.base.durable.new_hash()) fed every byte of the file in order, in the same
    pass that reads them (the bytes of tensors not in `names` are read for it too), so a caller
    can check that what it loaded is exactly what the file's name promises. (Hashing on a second
    thread while the next bytes are read was measured no faster on a loaded 2-core machine.)"""
    import torch

    by_code = {code: dtype for dtype, code in _torch_dtypes().items()}
    head: list[bytes] = []

    def read_at(offset, n):  # the header parse's reads, kept for the digest
        data = os.pread(fd, n, offset)
        head.append(data)
        return data

    tensors, data_start = parse_header(read_at, size)
    if digest is not None:
        for data in head:  # (0, 8) then (8, n): exactly the bytes before the data, in order
            digest.update(data)
    scratch = None
    out = {}
    # in file order: parse_header checked that the tensors tile the data exactly
    for name, e in sorted(tensors.items(), key=lambda kv: (kv[1]["start"], kv[1]["end"])):
        n = e["end"] - e["start"]
        wanted = names is None or name in names
        if not wanted and digest is None:
            continue
        if wanted:
            t = torch.empty(e["shape"], dtype=by_code[e["dtype"]])
            view = memoryview(t.view(-1).view(torch.uint8).numpy()) if n else None
        got = 0
        while got < n:
            if wanted:
                piece = view[got : min(n, got + CHUNK)]
            else:  # read only to be hashed
                if scratch is None:
                    scratch = memoryview(bytearray(CHUNK))
                piece = scratch[: min(CHUNK, n - got)]
            k = os.preadv(fd, [piece], data_start + e["start"] + got)
            if not k:
                raise HeaderError("file ends inside tensor data")
            if digest is not None:
                digest.update(piece[:k])
            got += k
        if wanted:
            out[name] = t
    return {name: out[name] for name in tensors if name in out}  # in the header's order, as before
