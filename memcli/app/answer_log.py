"""The log of answers: every question a pool answered, with its answer, in one SQLite database.

The file is `<data>/log.db` (`paths.data_dir()`, so `MEMCLI_HOME` relocates it), mode 0600, created by
memcli before SQLite opens it; an existing file must be a regular file of ours (a looser mode is
tightened to 0600 with one note). One row per answer: `record(entry)` writes it, `entries()` lists the
newest first (filtered by pool, time and words, `-q`), `count()`, `purge_pool()` (what `pool rm
--purge-log` runs), `reset()` (moves the file aside: `memcli log reset`). `memcli log` (cli_log.py)
shows them.

Guarantees:
- Logging never fails an answer: `record()` catches every error, says it once per process through
  `logging` ("memcli" logger: one stderr line under the CLI) or an `on_error` callback, and returns
  None. A damaged file is named with its fix; a read-only home is skipped with one note.
- Concurrent writers never corrupt it: WAL journal, a busy timeout, one IMMEDIATE transaction per
  record (the insert and any pruning). A process keeps one connection per thread (a server's record
  is then ~0.2 ms instead of ~20 ms for opening and closing the file), checked before each use.
- Bounded size: `log_max_mb` (default 100) bounds the pages in use. Each record compares page_count -
  freelist_count (two numbers of the file's header, ~12 µs) with it: a one-shot `memcli ask` logs one
  answer per process, so a check every N records would never run there. When over, the oldest rows go
  (their full-text index entries with them, the index merged and the file shrunk) until the log is at
  PRUNE_TO of the bound: pruning is a rare event, not a per-record cost. The write-ahead file is
  checkpointed at a tenth of the bound (4 MiB at most). A question or answer longer than
  MAX_TEXT_CHARS is cut with a marker; sources' JSON beyond MAX_SOURCES_CHARS is kept as a marked,
  cut string.
- Search (`query`) uses SQLite FTS5 over question and answer when the sqlite3 build has it (each word
  of the user's text is quoted, so no input is FTS syntax; `word*` is a prefix), LIKE otherwise.
- The schema has a version (PRAGMA user_version) and a list of migrations: a file of an older
  version is migrated on open, in one transaction; one of a newer memcli is refused, untouched.

Standard library only (sqlite3), no torch: `memcli log` is a light command.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import sqlite3
import stat
import threading
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

from memcli.base import paths
from memcli.base.clock import iso_z, now_iso
from memcli.base.durable import create_exclusive, file_kind
from memcli.base.errors import MemcliError
from memcli.base.text import one_line
from memcli.wire import VIA  # the entry points an answer can come through

FILE_NAME = "log.db"
MAX_TEXT_CHARS = 65_536  # per question and per answer; beyond it: cut, with a marker
MAX_SOURCES_CHARS = 65_536  # the sources' JSON; beyond it: kept as a marked, cut string
DEFAULT_MAX_MB = 100
PRUNE_TO = 0.8  # pruning leaves the log at this share of log_max_mb
BUSY_MS = 10_000  # how long a writer waits for another one
WAL_LIMIT_BYTES = 4 << 20  # the write-ahead file is truncated to this after a checkpoint
FIX = "move it aside with: memcli log reset"

log = logging.getLogger("memcli.app.answer_log")


class LogError(MemcliError, ValueError):
    """A one-line problem with the log's file (damaged, not ours, of a newer memcli, not writable):
    exit 1, HTTP 400."""


# --------------------------------------------------------------------------- an entry
@dataclass
class Entry:
    """One answer. Timings and token counts use the names of `Answer.to_json()`."""

    pool: str
    question: str
    answer: str
    via: str = "cli"
    model: str | None = None
    pool_version: int | None = None
    sources: Any = None  # JSON-ready data, only when the user asked for sources
    seconds_to_first_token: float | None = None
    seconds: float | None = None
    prompt_tokens: int | None = None
    new_tokens: int | None = None
    conversation: str | None = None  # the turns of one chat share it (new_conversation_id())
    turn: int | None = None  # 1, 2, ... within a conversation
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    time: str | None = None  # ISO 8601; now when not given


COLUMNS = ("id", "time", "pool", "pool_version", "model", "question", "answer", "sources",
           "seconds_to_first_token", "seconds", "prompt_tokens", "new_tokens", "via", "conversation", "turn",
           "temperature", "top_p", "seed")
_ENTRY_FIELDS = tuple(f.name for f in fields(Entry))


def new_conversation_id() -> str:
    """An id for the turns of one chat."""
    import uuid

    return uuid.uuid4().hex


def _row(entry: Entry | Mapping) -> dict:
    """The checked values of a row (ValueError naming the field for a caller's bug)."""
    if not isinstance(entry, Entry):
        unknown = sorted(set(entry) - set(_ENTRY_FIELDS))
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(map(str, unknown))}")
        entry = Entry(**entry)  # TypeError names a missing required field
    values = {name: getattr(entry, name) for name in _ENTRY_FIELDS}
    for key in ("pool", "question", "answer", "via"):
        if not isinstance(values[key], str):
            raise ValueError(f"{key} must be a string, not {type(values[key]).__name__}")
    if not values["pool"]:
        raise ValueError("pool must not be empty")
    if values["via"] not in VIA:
        raise ValueError(f"via must be one of {', '.join(VIA)}, not {values['via']!r}")
    for key in ("model", "conversation"):
        if values[key] is not None and not isinstance(values[key], str):
            raise ValueError(f"{key} must be a string or None")
    for key in ("pool_version", "prompt_tokens", "new_tokens", "turn", "seed"):
        value = values[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not -(1 << 63) <= value < 1 << 63):
            raise ValueError(f"{key} must be a 64-bit integer or None, not {value!r}")
    for key in ("seconds_to_first_token", "seconds", "temperature", "top_p"):
        value = values[key]
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{key} must be a finite number or None, not {value!r}")
            values[key] = float(value)
    values["time"] = _iso(values["time"], "time") if values["time"] is not None else now_iso()
    for key in ("pool", "model", "conversation"):
        if values[key] is not None:
            values[key] = _bounded(values[key], 4096)
    values["question"] = _bounded(values["question"])
    values["answer"] = _bounded(values["answer"])
    values["sources"] = _sources_json(values["sources"])
    return values


def _storable(text: str) -> str:
    """`text` as SQLite can store it: a lone surrogate (an undecodable byte of a command line) is
    written as its escape, not refused."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _bounded(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    text = _storable(text)
    if len(text) <= limit:
        return text
    return text[:limit] + f" [… {len(text) - limit:,} more characters not logged]"


def _sources_json(sources: Any) -> str | None:
    if sources is None:
        return None
    text = json.dumps(sources, ensure_ascii=False, allow_nan=False)
    if len(text) <= MAX_SOURCES_CHARS:
        return _storable(text)
    # still JSON, and says what it is: the start of the sources' JSON text
    return json.dumps({"truncated": True, "json": _storable(text[:MAX_SOURCES_CHARS])}, ensure_ascii=False)


def _iso(value: Any, what: str) -> str:
    """A time (datetime or ISO 8601 text) in memcli's one format; a time without an offset is UTC."""
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        return iso_z(moment.isoformat())
    if isinstance(value, str):
        try:
            datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            pass
        else:
            return iso_z(value.strip().replace("z", "Z"))
    raise LogError(f"{what} must be an ISO 8601 date or time (UTC unless it has an offset), "
                   f"like 2026-12-01 or 2026-12-01T10:00Z, not {str(value)[:60]!r}")


# --------------------------------------------------------------------------- the file
def path() -> Path:
    return paths.data_dir() / FILE_NAME


def _show(p: Path) -> str:
    return one_line(p)


def _check_file(p: Path, note: Callable[[str], None]) -> bool:
    """True when `p` is a regular file of ours (made 0600 when it was looser, with a note); False when
    there is nothing at `p`; LogError for anything else there."""
    try:
        st = os.lstat(p)
    except (FileNotFoundError, NotADirectoryError):
        return False
    if stat.S_ISLNK(st.st_mode):
        raise LogError(f"{_show(p)} is a symbolic link; refusing to use it ({FIX})")
    if not stat.S_ISREG(st.st_mode):
        raise LogError(f"{_show(p)} is {file_kind(st.st_mode)}, not a log database; refusing ({FIX})")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise LogError(f"{_show(p)} belongs to another user (uid {st.st_uid}); refusing to use it ({FIX})")
    if st.st_mode & 0o077:
        # ours, only too open (a copy restored with another umask): closing it is what the user wants
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
                     | getattr(os, "O_NONBLOCK", 0))
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        note(f"{_show(p)} was readable by others (mode {stat.S_IMODE(st.st_mode):04o}); it is now 0600")
    return True


def _create(p: Path) -> None:
    """An empty file of mode 0600 at `p` (whatever the umask), unless one appeared meanwhile."""
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LogError(f"cannot create {_show(p)}: {_show(p.parent)} is not a folder we can write "
                       f"({err.strerror or err})") from None
    try:
        fd = create_exclusive(p, 0o600)
    except FileExistsError:
        return  # another process made it: checked like any existing file
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _problem(err: BaseException, p: Path) -> str:
    """One line for an error of SQLite or the OS on the log's file."""
    where = _show(p)
    if isinstance(err, LogError):
        return str(err)
    if isinstance(err, sqlite3.DatabaseError):
        name = getattr(err, "sqlite_errorname", "")
        text = str(err)
        if name in ("SQLITE_NOTADB", "SQLITE_CORRUPT") or "not a database" in text or "malformed" in text:
            return f"{where} is damaged ({text}); {FIX}"
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
            return f"{where} is busy: another memcli held it for more than {BUSY_MS // 1000} s"
        if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")) or "readonly" in text:
            return f"cannot write {where} ({text})"
        if name.startswith("SQLITE_FULL"):
            return f"cannot write {where}: the disk is full"
        return f"{where}: {text}"
    if isinstance(err, OSError):
        what = err.strerror or str(err)
        if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return f"cannot write {_show(Path(err.filename)) if err.filename else where}: {what}"
        return f"{_show(Path(err.filename)) if err.filename else where}: {what}"
    return f"{where}: {type(err).__name__}: {err}"


class _Db:
    """An open log: a connection in autocommit mode (transactions are explicit) on a checked file."""

    def __init__(self, conn: sqlite3.Connection, p: Path):
        self.conn, self.path = conn, p
        self.pid: int | None = None
        self.identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file it was opened on
        self.page_size: int | None = None
        self.wal_limit: int | None = None
        self.fts = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'answers_fts'").fetchone() is not None

    def __enter__(self) -> "_Db":
        return self

    def __exit__(self, *exc) -> None:
        self.conn.close()

    def used_bytes(self) -> int:
        """Bytes of the pages in use (free pages are reused before the file grows): two numbers of the
        file's header, read in one statement."""
        if self.page_size is None:
            self.page_size = self.conn.execute("PRAGMA page_size").fetchone()[0]
        pages, free = self.conn.execute("SELECT * FROM pragma_page_count(), pragma_freelist_count()").fetchone()
        return (pages - free) * self.page_size


def _open(create: bool, note: Callable[[str], None]) -> _Db | None:
    """The log, checked and migrated; None when it does not exist and `create` is false. Raises
    LogError (one line naming the file) for anything else than a usable log."""
    p = path()
    try:
        if not _check_file(p, note):
            if not create:
                return None
            _create(p)
            _check_file(p, note)
        for suffix in ("-wal", "-shm"):  # SQLite gives them the database's mode; a leftover may differ
            _check_file(p.with_name(p.name + suffix), note)
        conn = sqlite3.connect(str(p), timeout=BUSY_MS / 1000, isolation_level=None)
    except (OSError, sqlite3.Error) as err:
        raise LogError(_problem(err, p)) from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_MS}")
        if conn.execute("PRAGMA user_version").fetchone()[0] == 0 and not _tables(conn):
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only a new file: before its first table
        if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")  # with WAL: never corrupt; a power cut may lose the last answers
        _migrate(conn, p)
        return _Db(conn, p)
    except BaseException as err:
        conn.close()
        if isinstance(err, (OSError, sqlite3.Error, LogError)):
            raise LogError(_problem(err, p)) from None
        raise


def _tables(conn: sqlite3.Connection) -> list[str]:
    return [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]


# --------------------------------------------------------------------------- schema and migrations
def _v1(conn: sqlite3.Connection) -> None:
    # AUTOINCREMENT: ids are never reused after pruning or a purge, so an id once shown names one answer
    conn.execute("""
        CREATE TABLE answers (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            time TEXT NOT NULL,
            pool TEXT NOT NULL,
            pool_version INTEGER,
            model TEXT,
            question TEXT NOT NULL,
            answer TEXT NOT NULL,
            sources TEXT,
            seconds_to_first_token REAL,
            seconds REAL,
            prompt_tokens INTEGER,
            new_tokens INTEGER,
            via TEXT NOT NULL,
            conversation TEXT,
            turn INTEGER,
            temperature REAL,
            top_p REAL,
            seed INTEGER
        )""")
    conn.execute("CREATE INDEX answers_by_pool ON answers (pool)")
    if not _fts5_available(conn):
        return  # searched with LIKE
    conn.execute("CREATE VIRTUAL TABLE answers_fts USING fts5(question, answer, content = 'answers', "
                 "content_rowid = 'id', tokenize = 'unicode61 remove_diacritics 2')")
    conn.execute("""CREATE TRIGGER answers_fts_insert AFTER INSERT ON answers BEGIN
        INSERT INTO answers_fts (rowid, question, answer) VALUES (new.id, new.question, new.answer); END""")
    conn.execute("""CREATE TRIGGER answers_fts_delete AFTER DELETE ON answers BEGIN
        INSERT INTO answers_fts (answers_fts, rowid, question, answer)
        VALUES ('delete', old.id, old.question, old.answer); END""")
    conn.execute("""CREATE TRIGGER answers_fts_update AFTER UPDATE OF question, answer ON answers BEGIN
        INSERT INTO answers_fts (answers_fts, rowid, question, answer)
        VALUES ('delete', old.id, old.question, old.answer);
        INSERT INTO answers_fts (rowid, question, answer) VALUES (new.id, new.question, new.answer); END""")


# Migration k takes a file of schema version k to k + 1 (user_version). A new column or index is a
# function appended here; a file is never changed in any other way.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_v1]


def schema_version() -> int:
    return len(MIGRATIONS)


def _fts5_available(conn: sqlite3.Connection) -> bool:
    try:
        conn.execute("CREATE VIRTUAL TABLE temp.fts5_probe USING fts5(x)")
    except sqlite3.OperationalError:
        return False
    conn.execute("DROP TABLE temp.fts5_probe")
    return True


def _migrate(conn: sqlite3.Connection, p: Path) -> None:
    target = schema_version()
    if conn.execute("PRAGMA user_version").fetchone()[0] == target:
        return
    conn.execute("BEGIN IMMEDIATE")  # another process may be migrating: read the version again under the lock
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > target:
            raise LogError(f"{_show(p)} was written by a newer memcli (log schema {version}, this one reads "
                           f"up to {target}); upgrade memcli, or {FIX}")
        for step in MIGRATIONS[version:]:
            step(conn)
        conn.execute(f"PRAGMA user_version = {target}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


# --------------------------------------------------------------------------- reporting
_said: set[str] = set()


def _say_once(message: str, on_error: Callable[[str], None] | None) -> None:
    """A problem of logging: to `on_error`, else once per process as a warning of the memcli logger."""
    if on_error is not None:
        on_error(message)
        return
    if message not in _said:
        _said.add(message)
        log.warning(message)


# --------------------------------------------------------------------------- the API
def enabled(settings=None) -> bool:
    """Whether answers are logged (config `log`, MEMCLI_LOG; on by default)."""
    if settings is None:
        from memcli.app.settings import load_settings

        settings = load_settings()
    return bool(getattr(settings, "log", True))


def max_bytes(settings=None) -> int:
    if settings is None:
        from memcli.app.settings import load_settings

        settings = load_settings()
    return int(getattr(settings, "log_max_mb", DEFAULT_MAX_MB)) << 20


def record(entry: Entry | Mapping, settings=None, on_error: Callable[[str], None] | None = None) -> int | None:
    """Log one answer; its id, or None when logging is off or failed. Never raises (an Exception):
    a failure is one line to `on_error` (default: a warning, once per process). Without `settings`
    the config file and environment are read now (~0.2 ms), so a long-lived process (a server) sees
    `memcli log off` at its next answer."""
    try:
        if settings is None:
            from memcli.app.settings import load_settings

            settings = load_settings()
        if not enabled(settings):
            return None
        values = _row(entry)
        limit = max_bytes(settings)
    except Exception as err:
        _say_once(f"answer not logged: {err}", on_error)
        return None
    p = path()
    try:
        return _insert(_writer(lambda line: _say_once(line, on_error)), values, limit)
    except Exception as err:
        close()  # the next record opens (and checks) the file again
        _say_once(f"answer not logged: {_problem(err, p)}", on_error)
        return None


def log_answer(answer, *, via: str, sampling=None, conversation: str | None = None, turn: int | None = None,
               settings=None, on_error: Callable[[str], None] | None = None) -> int | None:
    """Log an answer (`wire.Answer`) where it was decoded: in this process (`LocalBackend`) or in a
    server (/api/ask with the client's `via`, /v1/chat/completions as "openai"), so every answer is
    one row whichever way it came. Its sources are kept when they were asked for. Never raises
    (`record`)."""
    return record(Entry(
        pool=answer.pool, question=answer.question, answer=answer.text, via=via, model=answer.model or None,
        pool_version=answer.pool_version, sources=answer.attribution,
        seconds_to_first_token=answer.seconds_to_first_token, seconds=answer.seconds,
        prompt_tokens=answer.prompt_tokens, new_tokens=answer.new_tokens, conversation=conversation, turn=turn,
        temperature=sampling.temperature if sampling is not None else 0.0,
        top_p=sampling.top_p if sampling is not None else 1.0,
        seed=sampling.seed if sampling is not None else None,
    ), settings, on_error)


# A process that answers many questions (a server) keeps one connection per thread: a record is then
# one transaction (~0.1 ms), where opening and closing the file per record costs ~20 ms (the close
# checkpoints the write-ahead file, with fsyncs; benchmarks/bench_answer_log.py). The connection is
# used only while the path still names the same file, of ours, 0600, and in the process that opened it.
_cache = threading.local()
_abandoned: list = []  # connections a fork inherited: never used or closed in the child (SQLite's rule)


def _writer(note: Callable[[str], None]) -> _Db:
    p = path()
    cached = getattr(_cache, "db", None)
    if cached is not None:
        try:
            st = os.lstat(p)
        except OSError:
            st = None
        if (cached.pid == os.getpid() and cached.path == p and st is not None and stat.S_ISREG(st.st_mode)
                and (st.st_dev, st.st_ino) == cached.identity and not st.st_mode & 0o077):
            return cached
        close()
    db = _open(create=True, note=note)
    st = os.lstat(p)
    db.pid, db.identity = os.getpid(), (st.st_dev, st.st_ino)
    _cache.db = db
    return db


def close() -> None:
    """Close this thread's kept connection (a CLI's process exit does it too)."""
    cached = getattr(_cache, "db", None)
    _cache.db = None
    if cached is None:
        return
    if getattr(cached, "pid", None) != os.getpid():
        _abandoned.append(cached)
        return
    try:
        cached.conn.close()
    except sqlite3.Error:
        pass


def _insert(db: _Db, values: dict, limit: int) -> int:
    conn = db.conn
    names = [name for name in COLUMNS if name != "id"]
    # the write-ahead file is checkpointed (and cut back) at a tenth of the bound, 4 MiB at most
    wal = min(WAL_LIMIT_BYTES, limit // 10)
    if db.wal_limit != wal:
        conn.execute(f"PRAGMA wal_autocheckpoint = {max(16, wal // (db.page_size or 4096))}")
        conn.execute(f"PRAGMA journal_size_limit = {wal}")
        db.wal_limit = wal
    conn.execute("BEGIN IMMEDIATE")
    try:
        cursor = conn.execute(f"INSERT INTO answers ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                              [values[name] for name in names])
        new_id = cursor.lastrowid
        pruned = _prune(db, limit, keep_from=new_id) if db.used_bytes() > limit else 0
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    if pruned:
        _give_back_free_pages(conn)
    return new_id


def _give_back_free_pages(conn: sqlite3.Connection) -> None:
    """Shrink the file by its free pages (auto_vacuum = INCREMENTAL). Through executescript: the
    pragma frees one page per step, and execute() steps once."""
    conn.executescript("PRAGMA incremental_vacuum")


def _prune(db: _Db, limit: int, keep_from: int) -> int:
    """Delete the oldest rows (never `keep_from` or newer) until the pages in use are under PRUNE_TO of
    `limit`; inside the caller's transaction. The number of rows to delete is estimated from the
    average row's share of the pages, so a few rounds do it."""
    conn = db.conn
    target = int(limit * PRUNE_TO)
    removed = 0
    for _ in range(8):
        used = db.used_bytes()
        rows = conn.execute("SELECT count(*) FROM answers WHERE id < ?", (keep_from,)).fetchone()[0]
        if used <= target or rows == 0:
            break
        total = rows + 1
        n = max(1, min(rows, math.ceil(total * (used - target) / used)))
        conn.execute("DELETE FROM answers WHERE id IN (SELECT id FROM answers WHERE id < ? ORDER BY id LIMIT ?)",
                     (keep_from, n))
        removed += n
        if db.fts:
            # FTS5 records a deletion as a new entry until its segments merge: merge now, so the
            # pages of the deleted rows' index entries are free again and the size is measurable
            conn.execute("INSERT INTO answers_fts (answers_fts) VALUES ('optimize')")
    return removed


def _fts_query(text: str) -> str | None:
    """The user's words as an FTS5 query that is never a syntax error: each word a quoted string
    (quotes doubled), all of them required; `word*` is a prefix. None when no word has a letter or
    digit (nothing the index holds): such text is searched with LIKE."""
    terms = []
    for word in text.split():
        prefix = word.endswith("*") and len(word.rstrip("*")) > 0
        core = word.rstrip("*") if prefix else word
        if not any(ch.isalnum() for ch in core):
            continue
        terms.append('"' + core.replace('"', '""') + '"' + ("*" if prefix else ""))
    return " ".join(terms) or None


def _like_clause(text: str) -> tuple[str, list[str]]:
    clauses, params = [], []
    for word in text.split() or [text]:
        pattern = "%" + word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        clauses.append("(question LIKE ? ESCAPE '\\' OR answer LIKE ? ESCAPE '\\')")
        params += [pattern, pattern]
    return " AND ".join(clauses), params


def entries(pool: str | None = None, query: str | None = None, limit: int | None = 10,
            since: Any = None) -> list[dict]:
    """Logged answers, the newest first: of `pool`, holding every word of `query` (in the question or
    the answer), at or after `since` (ISO 8601 or datetime); at most `limit` (None or 0: all)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise LogError(f"limit must be a whole number >= 0, not {limit!r}")
    since_iso = _iso(since, "since") if since is not None else None
    db = _open(create=False, note=lambda line: _say_once(line, None))
    if db is None:
        return []
    with db:
        try:
            return _select(db, pool, query, limit, since_iso)
        except sqlite3.Error as err:
            raise LogError(_problem(err, db.path)) from None


def _select(db: _Db, pool, query, limit, since_iso) -> list[dict]:
    where, params = [], []
    if pool is not None:
        where.append("pool = ?")
        params.append(pool)
    if since_iso is not None:
        where.append("time >= ?")
        params.append(since_iso)
    tail = " ORDER BY id DESC" + (f" LIMIT {int(limit)}" if limit else "")
    sql = f"SELECT {', '.join(COLUMNS)} FROM answers"
    if query is not None and query.strip():
        fts = _fts_query(query) if db.fts else None
        if fts is not None:
            clauses = where + ["id IN (SELECT rowid FROM answers_fts WHERE answers_fts MATCH ?)"]
            try:
                rows = db.conn.execute(f"{sql} WHERE {' AND '.join(clauses)}{tail}", params + [fts]).fetchall()
                return [_as_dict(row) for row in rows]
            except sqlite3.OperationalError as err:
                if "fts5" not in str(err) and "MATCH" not in str(err).upper():
                    raise  # not the query (busy, I/O): reported as such
                # a query the tokenizer still refuses: searched with LIKE below, never an error
        clause, like = _like_clause(query)
        where.append(clause)
        params += like
    if where:
        sql += " WHERE " + " AND ".join(where)
    return [_as_dict(row) for row in db.conn.execute(sql + tail, params).fetchall()]


def _as_dict(row: tuple) -> dict:
    data = dict(zip(COLUMNS, row))
    if data["sources"] is not None:
        try:
            data["sources"] = json.loads(data["sources"])
        except ValueError:
            pass  # shown as stored
    return data


def count(pool: str | None = None) -> int:
    """How many answers are logged (of `pool`)."""
    db = _open(create=False, note=lambda line: _say_once(line, None))
    if db is None:
        return 0
    with db:
        try:
            if pool is None:
                return db.conn.execute("SELECT count(*) FROM answers").fetchone()[0]
            return db.conn.execute("SELECT count(*) FROM answers WHERE pool = ?", (pool,)).fetchone()[0]
        except sqlite3.Error as err:
            raise LogError(_problem(err, db.path)) from None


def purge_pool(pool: str) -> int:
    """Delete every logged answer of `pool`; the number deleted. The deleted text is overwritten
    (secure_delete), the index rebuilt, free pages given back and the write-ahead file emptied, so it
    is not left in the file either."""
    db = _open(create=False, note=lambda line: _say_once(line, None))
    if db is None:
        return 0
    with db:
        conn = db.conn
        try:
            conn.execute("PRAGMA secure_delete = ON")
            conn.execute("BEGIN IMMEDIATE")
            try:
                removed = conn.execute("DELETE FROM answers WHERE pool = ?", (pool,)).rowcount
                if removed and db.fts:
                    conn.execute("INSERT INTO answers_fts (answers_fts) VALUES ('optimize')")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            if removed:
                _give_back_free_pages(conn)
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            return removed
        except sqlite3.Error as err:
            raise LogError(_problem(err, db.path)) from None


def file_bytes() -> int:
    """Bytes on disk: the database and its write-ahead file."""
    total = 0
    for p in (path(), path().with_name(FILE_NAME + "-wal")):
        try:
            total += os.lstat(p).st_size
        except OSError:
            pass
    return total


def status(settings) -> dict:
    """What `memcli log status` shows: on or off (and why), the file, its answers and size."""
    info = {"enabled": enabled(settings), "source": settings.origin.get("log", "default"),
            "path": str(path()), "exists": os.path.lexists(path()), "answers": 0, "bytes": file_bytes(),
            "max_bytes": max_bytes(settings), "schema": schema_version(), "search": None}
    db = _open(create=False, note=lambda line: _say_once(line, None))
    if db is not None:
        with db:
            try:
                info["answers"] = db.conn.execute("SELECT count(*) FROM answers").fetchone()[0]
                info["used_bytes"] = db.used_bytes()
            except sqlite3.Error as err:
                raise LogError(_problem(err, db.path)) from None
            info["search"] = "fts5" if db.fts else "like"
    return info


def reset() -> Path | None:
    """Move the log aside (damaged or not) so the next answer starts a new one; where it went, or None
    when there was none. Nothing is deleted: the old file is kept, with its mode, beside the new."""
    close()
    p = path()
    if not os.path.lexists(p):
        return None
    stamp = now_iso().replace(":", "-")
    dest = p.with_name(f"{FILE_NAME}.old-{stamp}")
    try:
        os.rename(p, dest)
        wal = p.with_name(FILE_NAME + "-wal")
        if os.path.lexists(wal):
            os.rename(wal, dest.with_name(dest.name + "-wal"))  # SQLite finds it beside the moved file
        shm = p.with_name(FILE_NAME + "-shm")
        if os.path.lexists(shm):
            os.unlink(shm)  # an index of the write-ahead file, rebuilt from it
    except OSError as err:
        raise LogError(_problem(err, p)) from None
    return dest
