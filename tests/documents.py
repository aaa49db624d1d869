"""Test documents and the helpers that read them: PDFs built byte by byte (make_pdf, text_page,
BROKEN_PAGE, encrypt_pdf), files written, discovered and extracted in one call, a pipe-like stream,
and extraction in a child process under memory and CPU limits. Imported by the tests; no tests here."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
from pathlib import Path

import pypdf
import pytest

from memcli.ingest.discover import Source, discover
from memcli.ingest.extract import ExtractError, iter_text

from .support import REPO


def make_pdf(pages: list[bytes | None]) -> bytes:
    """A minimal valid PDF: one page per content stream (None: a page without content)."""
    objects = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        3: b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    }
    kids = []
    next_id = 4
    for content in pages:
        page_id, next_id = next_id, next_id + 1
        kids.append(page_id)
        page = b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >>"
        if content is not None:
            stream_id, next_id = next_id, next_id + 1
            objects[stream_id] = b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content)
            page += b" /Contents %d 0 R" % stream_id
        objects[page_id] = page + b" >>"
    objects[2] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % k for k in kids), len(kids))
    out = bytearray(b"%PDF-1.4\n")
    offsets = {}
    for number in sorted(objects):
        offsets[number] = len(out)
        out += b"%d 0 obj\n%s\nendobj\n" % (number, objects[number])
    xref_at = len(out)
    size = max(objects) + 1
    out += b"xref\n0 %d\n0000000000 65535 f \n" % size
    for number in range(1, size):
        out += b"%010d 00000 n \n" % offsets[number]
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size, xref_at)
    return bytes(out)


def text_page(text: str) -> bytes:
    return b"BT /F1 12 Tf 72 720 Td (%s) Tj ET" % text.encode("ascii")


BROKEN_PAGE = text_page("lost") + b" <<"


def encrypt_pdf(data: bytes, user_password: str) -> bytes:
    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(data)))
    # RC4 works without the optional cryptography package.
    writer.encrypt(user_password=user_password, owner_password="owner", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_bytes(data.encode("utf-8"))
    else:
        path.write_bytes(data)
    return path


def source_for(path: Path) -> Source:
    [found] = list(discover([str(path)]))
    assert isinstance(found, Source), found
    return found


def text_of(path: Path) -> str:
    return "".join(iter_text(source_for(path)))


def text_of_source(source: Source) -> str:
    return "".join(iter_text(source))


def extract_error(source: Source, stdin=None) -> str:
    with pytest.raises(ExtractError) as caught:
        list(iter_text(source, stdin=stdin))
    message = str(caught.value)
    assert message and "\n" not in message
    return message


class ShortReads(io.RawIOBase):
    """A pipe-like stream: a few bytes per read, then optionally an I/O error."""

    def __init__(self, data: bytes, fail_after: int | None = None) -> None:
        self.data, self.position, self.fail_after = data, 0, fail_after

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.fail_after is not None and self.position >= self.fail_after:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        block = self.data[self.position : self.position + 7]
        self.position += len(block)
        return block


_BOUNDED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({mem}, {mem}))
resource.setrlimit(resource.RLIMIT_CPU, ({cpu}, {cpu}))
from memcli.ingest.discover import discover
from memcli.ingest.extract import iter_text
[source] = discover([sys.argv[1]])
total = sum(len(piece) for piece in iter_text(source))
print(total)
"""


def extract_bounded(path: Path, mem: int = 400 << 20, cpu: int = 120) -> int:
    """Extract in a child process under an address-space and CPU-time limit; returns the text length.

    The bounds are far above what linear extraction needs (a few seconds, tens of MB) and far below
    what the quadratic behaviour of issue 13 item 21 took (over 5 minutes, 1.4 GiB)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _BOUNDED.format(mem=mem, cpu=cpu), str(path)], env=env,
                          capture_output=True, text=True, timeout=cpu * 3)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout)
