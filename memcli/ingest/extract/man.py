"""Man pages: roff rendered to plain text by mandoc or groff (whichever is installed), in a child
process with a time limit, with overstrikes and colour codes removed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import BinaryIO, Iterator

from memcli.ingest.extract.pieces import ExtractError, cut_pieces, os_reason, require_content

# A man page (or gzip member) larger than this is not rendered in memory.
MAN_MAX_BYTES = 16 << 20
RENDER_TIMEOUT_S = 120


def man_renderer() -> list[str] | None:
    """The command that renders a man page's roff to plain text here, or None."""
    if mandoc := shutil.which("mandoc"):
        return [mandoc, "-T", "utf8"]
    if groff := shutil.which("groff"):
        return [groff, "-t", "-mandoc", "-Tutf8", "-P-c", "-P-b", "-P-u"]
    return None


_OVERSTRIKE = re.compile(r".\x08")
_SGR = re.compile(r"\x1b\[[0-9;]*m")


def man_pieces(stream: BinaryIO, on_read=None) -> Iterator[str]:
    """The rendered text of the roff in `stream` (at most MAN_MAX_BYTES), in pieces."""
    command = man_renderer()
    if command is None:
        raise ExtractError("a man page, and no renderer is installed (install mandoc or groff, "
                           "or read the roff source with --type text)")
    roff = stream.read(MAN_MAX_BYTES + 1)
    if on_read is not None:
        on_read()
    if len(roff) > MAN_MAX_BYTES:
        raise ExtractError(f"man page over {MAN_MAX_BYTES >> 20} MiB; not rendered")
    try:
        done = subprocess.run(command, input=roff, capture_output=True, timeout=RENDER_TIMEOUT_S,
                              env={**os.environ, "LC_ALL": "C.UTF-8", "GROFF_NO_SGR": "1", "MANWIDTH": "80"})
    except subprocess.TimeoutExpired:
        raise ExtractError(f"rendering the man page took over {RENDER_TIMEOUT_S} s") from None
    except OSError as error:
        raise ExtractError(f"cannot run {os.path.basename(command[0])}: {os_reason(error)}") from None
    text = done.stdout.decode("utf-8", errors="replace")
    if not text.strip() and done.returncode != 0:
        first = done.stderr.decode("utf-8", errors="replace").strip().splitlines()[:1]
        raise ExtractError(f"cannot render the man page: {first[0] if first else 'renderer failed'}")
    text = _SGR.sub("", _OVERSTRIKE.sub("", text)).replace("\r", "").replace("\x00", "")
    return require_content(cut_pieces([text]), "man page without text (only an include of another page?)")
