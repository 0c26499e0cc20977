"""Files the built-in handlers write (recordings, sidecars, captures): names made from
call ids, created with a mode that keeps them private, replaced atomically."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from pathlib import Path
from typing import IO, Final

__all__ = ["DEFAULT_FILE_MODE", "claim", "create_file", "file_mode", "release",
           "safe_path_component", "write_atomically"]

# Recordings and captures hold callers' voices and data: owner read/write, group read.
DEFAULT_FILE_MODE: Final = 0o640
# Longest id kept whole in a file name (Twilio's ids are 34 characters).
MAX_ID_CHARS: Final = 64


def safe_path_component(name: str | None) -> str:
    """A file name from an id. Twilio's ids (``[A-Za-z0-9]``) are kept as they are; an id
    that had to change (other characters, over 64 characters) keeps its safe characters
    and gets ``-`` plus a short hash of the whole id, so two ids never share a file."""
    if not name:
        return "unknown"
    cleaned = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    if cleaned == name and len(name) <= MAX_ID_CHARS:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{cleaned[:MAX_ID_CHARS]}-{digest}"


# Files a live stream of this process is writing (the filesystem is the process's, so this
# set is too): a second stream with a live call's ids, a replayed call or one reusing them,
# gets a name of its own, so no file is ever written by two streams. Released at stop:
# bounded by the streams in progress.
_CLAIMED: set[Path] = set()


def claim(path: Path) -> Path:
    """``path`` for a stream to write, or ``<stem>-2<suffix>`` (``-3``, ...) when a live
    stream of this process is writing it; :func:`release` it when the stream ends."""
    candidate, copy = path, 1
    while candidate in _CLAIMED:
        copy += 1
        candidate = path.with_name(f"{path.stem}-{copy}{path.suffix}")
    _CLAIMED.add(candidate)
    return candidate


def release(path: Path) -> None:
    """The stream writing ``path`` has ended: another may write it."""
    _CLAIMED.discard(path)


def file_mode(value: int | str, *, key: str = "file_mode") -> int:
    """A permission mode from an option: an int (``0o640``) or an octal string
    (``"0640"``, ``"640"``). Raises ValueError naming ``key`` otherwise."""
    try:
        mode = int(value, 8) if isinstance(value, str) else int(value)
    except ValueError:
        raise ValueError(f"{key} must be an octal mode like \"0640\", got {value!r}") from None
    if not 0 <= mode <= 0o777:
        raise ValueError(f"{key} must be an octal mode like \"0640\", got {value!r}")
    return mode


def _directory_mode(mode: int) -> int:
    # Whoever may read a file may list its folder.
    return mode | ((mode & 0o444) >> 2)


def create_file(path: Path, mode: int, *, append: bool = False) -> IO[bytes]:
    """Open ``path`` for writing with exactly ``mode`` (whatever the umask), creating its
    folders (searchable by those who may read the file)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=_directory_mode(mode))
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    descriptor = os.open(path, flags, mode)
    try:
        if stat.S_ISREG(os.fstat(descriptor).st_mode):  # never a device a link points at
            os.fchmod(descriptor, mode)
    except OSError:
        os.close(descriptor)
        raise
    return os.fdopen(descriptor, "ab" if append else "wb")


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data``: a reader sees the old file or the new one, and a
    failed write (a full disk) leaves neither a half file nor a temporary one behind."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        with create_file(temporary, mode) as file:
            file.write(data)
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
