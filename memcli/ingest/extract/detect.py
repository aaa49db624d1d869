"""What a file is, from its content: its kind (PDF, man page, HTML, Markdown or text), whether it is
binary, and the encoding of its text.

A PDF is known by its `%PDF-` signature, a man page by its roff requests, HTML by its suffix or
doctype; every other file that decodes as text is text (source code, CSV, JSON, .rst, .org, .tex,
README, LICENSE). The encoding is a BOM's, else UTF-8 when the start is valid UTF-8, else the one
charset-normalizer finds most plausible.
"""

from __future__ import annotations

import codecs
import os
import re

# What `--type` can force.
TYPES = ("text", "markdown", "html", "pdf", "man")

_KIND_BY_SUFFIX = {
    ".pdf": "pdf",
    ".txt": "text",
    ".md": "markdown",
    ".markdown": "markdown",
    ".html": "html",
    ".htm": "html",
}
SUPPORTED_SUFFIXES: tuple[str, ...] = tuple(_KIND_BY_SUFFIX)

# How much of the start of a file is looked at to tell what it is.
SNIFF_BYTES = 8192
# Share of control characters above which a file is taken to be binary. Real text has
# almost none besides tabs and newlines; binary formats have plenty.
CONTROL_SHARE_LIMIT = 0.10
# Control characters that do occur in text files: backspace, tab, newlines, form feed, ESC
# (terminal colour codes in saved logs).
_TEXT_CONTROLS = frozenset("\b\t\n\v\f\r\x1b")

# Suffixes of man pages: name.1, name.3pm, name.1ssl, name.n (optionally .gz)
_MAN_SUFFIX = re.compile(r"\.([0-9][a-z]*|n|l)$")
_ROFF = re.compile(rb"^(?:\.TH[ \t]|\.Dd[ \t]|\.SH[ \t]|\.so[ \t]|\.\\\"|'\\\")", re.MULTILINE)

# Checked longest first: the UTF-32-LE BOM starts with the UTF-16-LE one.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)

# Among single-byte encodings that charset-normalizer finds about as plausible as its best guess,
# the Western European one is by far the most common in files (and latin-1 text is cp1252 text):
# on a few hundred bytes of French it otherwise names cp775 or cp1250 first.
_PREFERRED_ENCODINGS = ("cp1252", "latin_1", "iso8859_15")
_PLAUSIBILITY_MARGIN = 0.1


def kind_of(name: str, head: bytes, compressed: bool) -> str:
    """The kind of a file named `name` whose content starts with `head` (the decompressed start
    when `compressed`): "pdf", "man", "html", "markdown" or "text"."""
    name = name[:-3] if compressed and name.lower().endswith(".gz") else name
    suffix = os.path.splitext(name)[1].lower()
    if b"%PDF-" in head[:1024]:
        return "pdf"
    if suffix == ".pdf" and binary_reason(head.decode("latin-1")) is not None:
        return "pdf"  # a damaged PDF: let the PDF reader say what is wrong with it
    if _ROFF.search(head[:4096]) and (_MAN_SUFFIX.search(name) or head.startswith((b".\\\"", b".TH", b"'\\\""))):
        return "man"
    if suffix in (".html", ".htm", ".xhtml"):
        return "html"
    lowered = head[:512].lstrip().lower()
    if lowered.startswith((b"<!doctype html", b"<html")):
        return "html"
    if suffix in (".md", ".markdown"):
        return "markdown"
    return "text"


def detect_bom(head: bytes) -> tuple[str, int]:
    """The encoding a BOM at the start of `head` names, and the BOM's length ("utf-8", 0 if none)."""
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            return encoding, len(bom)
    return "utf-8", 0


def binary_reason(sample: str) -> str | None:
    """Why `sample` (the start of a file) looks like binary data, or None if it looks like text."""
    if not sample:
        return None
    if "\x00" in sample:
        return "binary content (NUL bytes), not a text file"
    controls = sum(1 for char in sample if (char < " " or char == "\x7f") and char not in _TEXT_CONTROLS)
    if controls / len(sample) > CONTROL_SHARE_LIMIT:
        return "binary content (many control characters), not a text file"
    return None


def utf8_prefix_valid(head: bytes) -> bool:
    """Whether `head` is UTF-8, allowing a character cut off at its end."""
    try:
        codecs.getincrementaldecoder("utf-8")("strict").decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def detect_encoding(head: bytes) -> str | None:
    """The encoding charset-normalizer finds most plausible for `head`, or None."""
    from charset_normalizer import from_bytes

    matches = list(from_bytes(head))
    if not matches:
        return None
    best = matches[0]
    for match in matches:
        if match.encoding in _PREFERRED_ENCODINGS and match.chaos <= best.chaos + _PLAUSIBILITY_MARGIN:
            return match.encoding
    return best.encoding
