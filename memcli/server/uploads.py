"""An inject's upload: the sources a client found, spooled into a private folder, then read as the
sources of an inject under the names the client sent (the server never opens a path a client names).

The body is a sequence of `wire.UploadHeader` lines, in the order the client's discovery found
them: a source's line is followed by its `size` bytes; a file the client could not read comes as
its line alone (it keeps its place in the report); the files the client left out by type or
--glob come as one line (they are counted in the report's summary).
"""

from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from starlette.requests import Request

from memcli.server.bodies import bounded_json
from memcli.wire import BadRequest, InjectReport, TooLarge, UploadHeader

UPLOAD_LIMIT = int(os.environ.get("MEMCLI_SERVER_MAX_UPLOAD", 4 * 1024**3))  # one inject request
MAX_HEADER = 65536  # bytes of one header line


def kinds() -> tuple[str, ...]:
    """The kinds of source an upload may name (what extraction reads)."""
    from memcli.ingest.extract import TYPES

    return (*TYPES, "stdin")


@dataclass
class Spooled:
    """An upload received: per entry its header and our copy of its bytes (None: a skip)."""

    folder: Path
    entries: list[tuple[UploadHeader, Path | None]] = field(default_factory=list)
    ignored: dict | None = None

    def sources(self, pool: str):
        """(the inject's items in order, its report with the ignored files counted, stdin's copy
        opened or None). Each Source reads our copy under the name the client sent."""
        from memcli.ingest.discover import Skipped, Source

        report = InjectReport(pool=pool, model="")
        if self.ignored is not None:
            report.ignored_by_type = dict(self.ignored["by_type"])
            report.ignored_by_glob = self.ignored["by_glob"]
        items, stdin = [], None
        for header, copy in self.entries:
            if header.skipped is not None:
                items.append(Skipped(header.name, header.skipped))
            elif header.kind == "stdin":
                stdin = open(copy, "rb")
                items.append(Source("-", "stdin", None, encoding=header.encoding, forced=header.forced))
            else:
                items.append(Source(str(copy), header.kind, header.size, header.compressed, header.encoding,
                                    forced=header.forced, name=header.name))
        return items, report, stdin

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _header(line: bytes, spooled: Spooled, allowed: tuple[str, ...]) -> UploadHeader:
    header = UploadHeader.from_json(bounded_json(line, 4, "an upload's file header"), allowed)
    if header.ignored is not None:
        if spooled.ignored is not None:
            raise BadRequest("an upload names its ignored files at most once")
        return header
    if header.kind == "stdin" and any(h.kind == "stdin" for h, _ in spooled.entries):
        raise BadRequest("an upload holds stdin (-) at most once")
    return header


def _copy_name(header: UploadHeader) -> str:
    """The copy keeps the file's own name (the server's log stays readable): only its last part,
    and never a name that could leave the copy's folder."""
    name = os.path.basename(header.name) if header.kind != "stdin" else "stdin"
    if name in ("", ".", "..") or "\x00" in name or len(os.fsencode(name)) > 200:
        name = "upload"
    return name


async def receive(request: Request, root: Path) -> Spooled:
    """Spool the uploaded sources into a private folder under `root` (0700: the uploads are
    somebody's documents); BadRequest or TooLarge for a body that is not a whole upload."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    spooled = Spooled(Path(root) / secrets.token_hex(8))
    spooled.folder.mkdir(mode=0o700)
    allowed = kinds()
    total = 0
    buffer = bytearray()
    current = None  # (file object, bytes still to come)
    try:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > UPLOAD_LIMIT:
            raise TooLarge(f"the upload is {int(length)} bytes; the limit is {UPLOAD_LIMIT}")
        async for piece in request.stream():
            total += len(piece)
            if total > UPLOAD_LIMIT:
                raise TooLarge(f"the upload is over the limit of {UPLOAD_LIMIT} bytes")
            buffer += piece
            while buffer:
                if current is None:
                    newline = buffer.find(b"\n")
                    if newline < 0:
                        if len(buffer) > MAX_HEADER:
                            raise BadRequest("an upload's file header is not one JSON line")
                        break
                    header = _header(bytes(buffer[:newline]), spooled, allowed)
                    del buffer[:newline + 1]
                    if header.ignored is not None:
                        spooled.ignored = header.ignored
                        continue
                    if header.skipped is not None:
                        spooled.entries.append((header, None))
                        continue
                    copy = spooled.folder / str(len(spooled.entries)) / _copy_name(header)
                    copy.parent.mkdir(mode=0o700)
                    spooled.entries.append((header, copy))
                    current = [open(copy, "xb"), header.size]
                    if header.size == 0:
                        current[0].close()
                        current = None
                    continue
                take = min(current[1], len(buffer))
                current[0].write(buffer[:take])
                del buffer[:take]
                current[1] -= take
                if current[1] == 0:
                    current[0].close()
                    current = None
        if current is not None or buffer:
            raise BadRequest("the upload ended inside a file")
        if not spooled.entries:
            raise BadRequest("nothing to inject: the upload holds no file")
        return spooled
    except BaseException:
        if current is not None:
            current[0].close()
        spooled.remove()
        raise
