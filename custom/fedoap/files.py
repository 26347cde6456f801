"""Files written so that a crash, a second writer or a permissive umask never leaves a reader with half a file or a
file others can read: the one atomic-write primitive every writer of the package uses (JSON results, site outputs at
rest, HE keys, the privacy ledger's neighbours)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["write_atomic", "make_private_dir", "PRIVATE_FILE_MODE", "PRIVATE_DIR_MODE"]

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def make_private_dir(path: str | os.PathLike) -> Path:
    """Create the folder and any missing parent as 0700 (the umask cannot widen it); existing folders are left as
    they are."""
    path = Path(path)
    missing = []
    for folder in (path, *path.parents):
        if folder.is_dir():
            break
        missing.append(folder)
    for folder in reversed(missing):
        try:
            os.mkdir(folder, PRIVATE_DIR_MODE)
        except FileExistsError:  # another writer made it first: its mode is its own
            continue
        os.chmod(folder, PRIVATE_DIR_MODE)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable; some file systems cannot open or sync a folder, which only weakens durability."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask (read from /proc where it can be, without changing it; else set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, data: bytes, mode: int | None = PRIVATE_FILE_MODE) -> Path:
    """Write ``data`` to ``path`` with exactly ``mode`` (None: 0666 less the umask, as ``open()`` would): a unique
    temporary file next to it (created 0600, so never readable by others even for a moment), chmod, fsync,
    ``os.replace``, fsync of the folder. A reader sees the old file or the whole new one; on any error the temporary
    file is removed and the old file is left as it was.

    Raises:
        OSError: the folder cannot be written (it is not created here: see :func:`make_private_dir`).
    """
    path = Path(path)
    if mode is None:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            fd = -1  # the file object owns it now
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path
