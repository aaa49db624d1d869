"""HTML: the text a browser would show, laid out roughly as it would, read as a stream.

`HtmlLexer` is linear in the input's size whatever the markup (html.parser re-scans a tag that
spans many reads: quadratic time, issue 13 item 21); `VisibleText` lays out what it finds.
"""

from __future__ import annotations

import html
import re
from typing import BinaryIO, Iterator

from memcli.ingest.extract.pieces import cut_pieces, require_content
from memcli.ingest.extract.text import decoded_blocks


class VisibleText:
    """Lays out the text a browser would show, roughly as it would.

    Whitespace inside text collapses to single spaces (as HTML renders it), block elements
    start new lines, paragraph-like ones leave a blank line, and runs of blank lines
    collapse to one. Output accumulates in `self.out` for the caller to drain.
    """

    HIDDEN = frozenset({"noscript", "template"})  # script and style are skipped by the lexer
    PARAGRAPH = frozenset(
        {"p", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre", "table", "ul", "ol", "dl", "figure", "hr"}
    )
    LINE = frozenset(
        {
            "div", "li", "tr", "dt", "dd", "section", "article", "header", "footer", "nav", "aside", "main",
            "form", "fieldset", "address", "caption", "figcaption", "details", "summary", "title", "body",
        }
    )  # fmt: skip
    PRESERVED = frozenset({"pre", "textarea"})
    VOID = frozenset({"br", "hr", "img", "input", "meta", "link", "wbr", "area", "base", "col", "embed", "source"})

    def __init__(self) -> None:
        self.out: list[str] = []
        self._hidden_depth = 0
        self._preserved_depth = 0
        self._pending_newlines = 0
        self._pending_space = False
        self._at_start = True

    def tag(self, name: str, closing: bool, self_closing: bool) -> None:
        if self_closing or name in self.VOID:
            self._break_for(name)  # no content, so nothing to hide or preserve
            return
        step = -1 if closing else 1
        if name in self.HIDDEN:
            self._hidden_depth = max(0, self._hidden_depth + step)
            return
        if name in self.PRESERVED:
            self._preserved_depth = max(0, self._preserved_depth + step)
        self._break_for(name)

    def _break_for(self, tag: str) -> None:
        if self._hidden_depth:
            return
        if tag == "br":
            self._pending_newlines = min(2, self._pending_newlines + 1)
        elif tag in self.PARAGRAPH:
            self._pending_newlines = 2
        elif tag in self.LINE:
            self._pending_newlines = max(1, self._pending_newlines)

    def data(self, data: str) -> None:
        if self._hidden_depth or not data:
            return
        if self._preserved_depth:
            self._write(data)
            return
        if data[0].isspace():
            self._pending_space = True
        collapsed = " ".join(data.split())
        if collapsed:
            self._write(collapsed)
        if data[-1].isspace():
            self._pending_space = True

    def _write(self, text: str) -> None:
        if not self._at_start:
            if self._pending_newlines:
                self.out.append("\n" * self._pending_newlines)
            elif self._pending_space:
                self.out.append(" ")
        self.out.append(text)
        self._at_start = False
        self._pending_newlines = 0
        self._pending_space = False


_TAG_START = re.compile(r"<(?:(/?)([A-Za-z][^\s/>]{0,63})|(!--)|([!?/]))")
_TAG_END_OR_QUOTE = re.compile(r">|=\s*([\"'])")
_RAW_TEXT = frozenset({"script", "style"})
_PARTIAL_ENTITY = re.compile(r"&#?[A-Za-z0-9]{0,32}$")


class HtmlLexer:
    """A streaming HTML lexer for visible text, linear in the input's size.

    Every character is looked at a bounded number of times: text runs up to the next "<",
    tags are skipped to their ">" (quoted attribute values jumped over in one search), comments
    to "-->", script and style bodies to their end tag. Only a tag's name is kept, so a tag of
    any length costs memory for 64 characters (html.parser keeps re-scanning a tag that spans
    many reads: quadratic time). What it cannot complete at the end of a block it carries to
    the next, and that carry never holds more than a few dozen characters outside a text run.
    """

    def __init__(self, sink: VisibleText) -> None:
        self.sink = sink
        self.buffer = ""
        self.state = "text"  # "text" | "tag" | "quoted" | "comment" | "decl" | "raw"
        self.quote = ""
        self.tag_name = ""
        self.closing = False
        self.last_tag_char = ""  # "/" before ">" makes a self-closing tag
        self.raw_end: re.Pattern | None = None

    def feed(self, text: str, final: bool = False) -> None:
        buf = self.buffer + text
        self.buffer = ""
        i, n = 0, len(buf)
        while i < n:
            if self.state == "text":
                m = _TAG_START.search(buf, i)
                if not final and (m is None or n - m.start() < 4 or (m.group(2) and m.end() == n)):
                    # the block may end inside a tag's start or an entity: carry that over
                    if m is not None:
                        keep = m.start()
                    else:
                        lt = buf.rfind("<", max(i, n - 3))
                        keep = lt if lt >= 0 else n
                    if (entity := _PARTIAL_ENTITY.search(buf, max(i, keep - 34), keep)) is not None:
                        keep = entity.start()
                    self._data(buf[i:keep])
                    self.buffer = buf[keep:]
                    return
                if m is None:
                    self._data(buf[i:])
                    return
                self._data(buf[i:m.start()])
                if m.group(2):
                    self.closing, self.tag_name = bool(m.group(1)), m.group(2).lower()
                    self.last_tag_char = ""
                    self.state = "tag"
                elif m.group(3):
                    self.state = "comment"
                else:
                    self.state = "decl"
                i = m.end()
            elif self.state == "tag":
                m = _TAG_END_OR_QUOTE.search(buf, i)
                if m is None:
                    # keep a trailing "=" and spaces: the quote may come in the next block
                    tail = buf[i:]
                    stripped = tail.rstrip()
                    if stripped.endswith("="):
                        self.buffer = "="
                    self.last_tag_char = stripped[-1:] or self.last_tag_char
                    return
                if m.group(0) == ">":
                    self.last_tag_char = buf[m.start() - 1] if m.start() > i else self.last_tag_char
                    self._end_tag()
                    i = m.end()
                else:
                    self.quote, self.state, i = m.group(1), "quoted", m.end()
            elif self.state == "quoted":
                j = buf.find(self.quote, i)
                if j < 0:
                    return
                self.state, self.last_tag_char, i = "tag", "", j + 1
            elif self.state == "comment":
                j = buf.find("-->", i)
                if j < 0:
                    self.buffer = buf[max(i, n - 2):]
                    return
                self.state, i = "text", j + 3
            elif self.state == "decl":
                j = buf.find(">", i)
                if j < 0:
                    return
                self.state, i = "text", j + 1
            else:  # raw text of script/style: up to its end tag
                m = self.raw_end.search(buf, i)
                if m is None:
                    self.buffer = buf[max(i, n - 10):]
                    return
                self.state, self.closing, self.tag_name, self.last_tag_char = "tag", True, m.group(1).lower(), ""
                i = m.end()

    def _end_tag(self) -> None:
        name, self.state = self.tag_name, "text"
        if name in _RAW_TEXT:
            if not self.closing and self.last_tag_char != "/":
                self.state = "raw"
                self.raw_end = re.compile(r"</(" + name + r")\b", re.IGNORECASE)
            return
        self.sink.tag(name, self.closing, self.last_tag_char == "/")

    def _data(self, text: str) -> None:
        if text:
            self.sink.data(html.unescape(text) if "&" in text else text)


def html_pieces(stream: BinaryIO, encoding: str | None = None, forced: bool = False, on_read=None) -> Iterator[str]:
    """The visible text of the HTML in `stream`, in pieces (decoded as `text.decoded_blocks` decodes)."""
    def visible_text() -> Iterator[str]:
        sink = VisibleText()
        lexer = HtmlLexer(sink)
        for block in decoded_blocks(stream, "empty file", encoding, forced, on_read):
            lexer.feed(block)
            if sink.out:
                yield "".join(sink.out)
                sink.out.clear()
        lexer.feed("", final=True)
        if sink.out:
            yield "".join(sink.out)

    return require_content(cut_pieces(visible_text()), "no visible text in HTML (only scripts, styles or markup)")
