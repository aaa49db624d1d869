"""Manifests: the one JSON document that is a pool version, and how every JSON document the
store reads is parsed (memcli's bounded parser, memcli.base.jsonbound, then checked field by field).

format_version 2 (written today)::

    {"format_version": 2, "name": str, "version": int >= 1, "created": time, "updated": time,
     "parts": {part_id: {"sha256": hex64, "bytes": int}},   content in <root>/.objects/<sha256>
     "log": {"bytes": int, "records": int},                 committed prefix of <pool>/log.jsonl
     "meta": {...}}                                          the caller's (checked by the store's MetaChecks)

format_version 1 (memcli before the content-addressed store) has no "log" and keeps its parts
in <pool>/parts/<part_id>.safetensors; it is read as it is and rewritten as version 2 on the
pool's first write.
"""

from __future__ import annotations

import json
import re
from typing import Any

from memcli.base.jsonbound import MAX_DEPTH, JsonRefused, load_json

from .errors import InvalidPoolName, PoolCorrupt, PoolError

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20
MAX_PARTS = 100_000

NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
PART_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
SHA_RE = re.compile(r"[0-9a-f]{64}")
TIME_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?(Z|[+-]\d\d:\d\d)?")


def parse_json(raw: bytes, what: str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse a JSON document read from disk or an archive with memcli's one bounded parser
    (memcli.base.jsonbound); any failure is one PoolCorrupt line naming `what`."""
    try:
        return load_json(raw, max_depth)
    except JsonRefused as exc:
        raise PoolCorrupt(f"{what} {exc.reason}") from None


def is_int(value: Any, low: int = 0, high: int = 1 << 62) -> bool:
    return type(value) is int and low <= value <= high


def check_manifest(m: Any, what: str) -> dict:
    """Validate a manifest's structure (every field's type and range); PoolCorrupt naming the
    file and the field otherwise. Returns `m`."""
    where = f"{what}: manifest.json"
    if not isinstance(m, dict):
        raise PoolCorrupt(f"{where} is not a JSON object")
    fv = m.get("format_version")
    if not is_int(fv, 0):
        raise PoolCorrupt(f"{where} has no valid 'format_version'")
    if fv not in READABLE_FORMATS:
        newer = fv > FORMAT_VERSION
        raise PoolCorrupt(
            f"{where} has format_version {fv} ({'a newer' if newer else 'an unknown'} format) but this memcli "
            f"reads format_version {', '.join(map(str, READABLE_FORMATS))}" + ("; upgrade memcli" if newer else "")
        )
    if not is_int(m.get("version"), 1):
        raise PoolCorrupt(f"{where} has an invalid 'version' (an integer >= 1 is expected)")
    if not isinstance(m.get("name"), str):
        raise PoolCorrupt(f"{where} has an invalid 'name'")
    for key in ("created", "updated"):
        if not isinstance(m.get(key), str) or not TIME_RE.fullmatch(m[key]):
            raise PoolCorrupt(f"{where} has an invalid '{key}' (an ISO 8601 time is expected)")
    if not isinstance(m.get("meta"), dict):
        raise PoolCorrupt(f"{where} has an invalid 'meta' (an object is expected)")
    parts = m.get("parts")
    if not isinstance(parts, dict):
        raise PoolCorrupt(f"{where} has an invalid 'parts' (an object is expected)")
    if len(parts) > MAX_PARTS:
        raise PoolCorrupt(f"{where} lists {len(parts)} parts (at most {MAX_PARTS})")
    for pid, entry in parts.items():
        if not PART_RE.fullmatch(pid):
            raise PoolCorrupt(f"{where} lists an invalid part id {pid!r:.60}")
        if (not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str)
                or not SHA_RE.fullmatch(entry["sha256"]) or not is_int(entry.get("bytes"))):
            raise PoolCorrupt(f"{where} has an invalid entry for part {pid} (sha256 and bytes are expected)")
    if fv >= 2:
        log = m.get("log")
        if not isinstance(log, dict) or not is_int(log.get("bytes")) or not is_int(log.get("records")):
            raise PoolCorrupt(f"{where} has an invalid 'log' (bytes and records are expected)")
    return m


def manifest_bytes(m: dict) -> bytes:
    return (json.dumps(m, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def validate_name(name: str) -> str:
    """Return `name` if it is a valid pool name, else raise InvalidPoolName.

    Rule: 1-64 characters from letters, digits, '-', '_' and '.', not starting with '.'.
    Never touches the disk."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        shown = repr(name)
        if isinstance(name, str) and len(name) > 64:
            shown = f"{repr(name[:20])[:-1]}...' ({len(name)} characters)"
        raise InvalidPoolName(
            f"invalid pool name {shown}: use 1-64 letters, digits, '-', '_' or '.', not starting with '.'"
        )
    return name


def validate_part_id(part_id: str) -> str:
    """Part ids are names inside a manifest: [A-Za-z0-9._-]{1,128}, not starting with '.'."""
    if not isinstance(part_id, str) or not PART_RE.fullmatch(part_id):
        raise PoolError(
            f"invalid part id {part_id!r:.60}: use 1-128 letters, digits, '-', '_' or '.', not starting with '.'"
        )
    return part_id
