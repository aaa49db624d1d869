"""PDF: the text layer of every page, read with pypdf, one page at a time (a damaged page is
logged and skipped; a damaged file, an encrypted one or one without text is an ExtractError).
"""

from __future__ import annotations

import logging
from typing import BinaryIO, Iterator

from memcli.base.text import one_line
from memcli.ingest.extract.pieces import REASON_CHARS, ExtractError, Reading, cut_pieces

logger = logging.getLogger(__name__)


def pdf_pieces(stream: BinaryIO, name: str, reading: Reading | None = None) -> Iterator[str]:
    """One piece per page that has text (cut further only if a page is huge); `name` labels the
    source in the log of skipped pages, `reading` counts pages.

    pypdf is handed the open file rather than the path: given a path it reads the whole
    file into memory. Any exception from pypdf means a damaged file; it raises many kinds.
    """
    import pypdf  # only PDFs need it (its import is not free)

    try:
        reader = pypdf.PdfReader(stream, strict=False)
        if reader.is_encrypted and reader.decrypt("") == pypdf.PasswordType.NOT_DECRYPTED:
            raise ExtractError("PDF is encrypted (password protected)")
        page_count = len(reader.pages)
    except ExtractError:
        raise
    except pypdf.errors.DependencyError as error:
        raise ExtractError(f"cannot decrypt PDF: {one_line(error, REASON_CHARS)}") from None
    except Exception as error:
        raise ExtractError(f"corrupt or truncated PDF: {one_line(error, REASON_CHARS) or type(error).__name__}") from None
    if page_count == 0:
        raise ExtractError("PDF has no pages")
    if reading is not None:
        reading.done, reading.total, reading.unit = 0, page_count, "pages"

    failures: list[str] = []
    pages_with_text = 0
    for index in range(page_count):
        if reading is not None:
            reading.done = index + 1
        try:
            text = reader.pages[index].extract_text()
        except Exception as error:
            reason = one_line(error, REASON_CHARS) or type(error).__name__
            failures.append(reason)
            logger.warning("%r: skipping unreadable page %d: %s", name, index + 1, reason)
            continue
        text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "").strip()
        if not text:
            continue
        if pages_with_text:
            text = "\n\n" + text
        pages_with_text += 1
        yield from cut_pieces([text])
    if len(failures) == page_count:
        raise ExtractError(f"no page of the PDF could be read (first error: {failures[0]})")
    if not pages_with_text:
        raise ExtractError("no extractable text (scanned PDF?)")
