"""The store's own folders: real folders, never symbolic links, never followed.

The root (`<data>/pools`) may be reached through links the user made (a data folder on another
disk, say). Every folder *inside* it that memcli keeps (.objects, .locks, .content-keys, .damaged,
a pool's folder and its format-1 parts/ folder) is opened with O_DIRECTORY | O_NOFOLLOW and the
files in it are opened, written, renamed and removed relative to that descriptor: a link put in
place of one of those folders is refused, never followed, so no cleanup deletes and no commit
writes outside the store. A file (or anything else) where a folder belongs is named in one line
with the fix. A folder that cannot be made because the store is read-only (EROFS, EACCES, EPERM)
raises PoolReadOnly: reading commands go on without it, writing commands stop with that line.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from memcli.base.durable import O_BINARY, O_CLOEXEC, O_DIRECTORY, O_NOFOLLOW, TMP, file_kind, token, write_all

from .errors import PoolError, PoolReadOnly

READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)
_DIR_FLAGS = os.O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC


def is_read_only(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in READ_ONLY_ERRNOS


def read_only(root: Path, exc: OSError) -> PoolReadOnly:
    """The one line of a writing command on a store it cannot write."""
    reason = exc.strerror or str(exc)
    return PoolReadOnly(f"the pool store {root} is read-only ({reason}): this command needs to write there; "
                        f"reading commands (pool ls, info, verify, export, ask) still work")


def not_a_folder(path: Path, mode: int) -> PoolError:
    """`path` holds something else than the folder memcli keeps there: named, with the fix."""
    if stat.S_ISLNK(mode):
        return PoolError(f"{path} is a symbolic link where memcli keeps a folder, and the store never follows one: "
                         f"put the folder itself there (mv it in place of the link), or link {path.parent} as a "
                         f"whole instead, and try again")
    kind = "a file" if stat.S_ISREG(mode) else file_kind(mode)
    return PoolError(f"{path} is {kind} where memcli keeps a folder: move it away "
                     f"(mv '{path}' '{path}.moved') and try again")


def ancestor_problem(path: Path) -> PoolError | None:
    """The topmost existing component of `path` that is not a folder, named with the fix."""
    for p in [*reversed(Path(path).parents), Path(path)]:
        try:
            st_ = os.stat(p)
        except OSError:
            continue
        if not stat.S_ISDIR(st_.st_mode):
            return not_a_folder(p, st_.st_mode)
    return None


def make_root(root: Path) -> None:
    """Make the store's root folder (and its parents) if absent; a file on the way is named with
    the fix; a read-only home raises PoolReadOnly."""
    try:
        st_ = os.stat(root)
        if stat.S_ISDIR(st_.st_mode):
            return
        raise not_a_folder(root, st_.st_mode)
    except FileNotFoundError:
        pass
    except NotADirectoryError:
        raise ancestor_problem(root) or PoolError(f"cannot make the pool store {root} (not a folder)") from None
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ancestor_problem(root) or PoolError(f"cannot make the pool store {root} (not a folder)") from None
    except OSError as exc:
        if is_read_only(exc):
            raise read_only(root, exc) from None
        raise


def check_root(root: Path) -> bool:
    """True when the root is a folder, False when it is absent; a file where it (or a folder
    above it) belongs is named with the fix."""
    try:
        st_ = os.stat(root)
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        problem = ancestor_problem(root)
        if problem is None:
            return False
        raise problem from None
    if not stat.S_ISDIR(st_.st_mode):
        raise not_a_folder(root, st_.st_mode)
    return True


def open_dir(root: Path, name: str, create: bool = False, dir_fd: int | None = None) -> int | None:
    """A descriptor of the folder `root/name`, never through a symbolic link (with `dir_fd`, `name`
    is opened relative to it and `root` is only the path it stands for, for messages). Absent:
    made (mode 0700) when create=True, else None. Something else there: PoolError naming it with
    the fix. The caller closes the fd."""
    path = Path(root) / name
    where = name if dir_fd is not None else path
    for _attempt in range(3):
        try:
            return os.open(where, _DIR_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            if not create:
                if dir_fd is None:
                    check_root(Path(root))  # a file where the root (or a folder above it) belongs
                return None
            if dir_fd is None:
                make_root(Path(root))
            try:
                os.mkdir(where, 0o700, dir_fd=dir_fd)
            except FileExistsError:
                continue
            except OSError as exc:
                if is_read_only(exc):
                    raise read_only(Path(root), exc) from None
                raise
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                try:
                    st_ = os.lstat(where, dir_fd=dir_fd)
                except OSError:
                    problem = ancestor_problem(path) if dir_fd is None else None
                    raise problem or PoolError(f"cannot open {path} ({exc.strerror})") from None
                raise not_a_folder(path, st_.st_mode) from None
            raise PoolError(f"cannot open {path} ({exc.strerror})") from None
    raise PoolError(f"cannot open {path}")


def fsync_fd(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:  # pragma: no cover - filesystems that cannot fsync folders
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise


def replace_at(dfd: int, name: str, data: bytes) -> None:
    """Atomically make `name` in the folder open as `dfd` hold `data` (a temporary file in that
    folder, fsync, rename, fsync of the folder): the folder-relative twin of base.durable.replace_file."""
    tmp = f"{TMP}{name}-{token()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC | O_BINARY, 0o600, dir_fd=dfd)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
        raise
    fsync_fd(dfd)
