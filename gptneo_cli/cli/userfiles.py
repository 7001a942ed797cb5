"""Writing the user's files (`generate --output`, `chat /save`): all or nothing.

A file is written beside its destination under a temporary name, flushed to disk, then
renamed over it in one step: a full disk, a crash or Ctrl-C leaves the old file whole
(and no temporary file behind), never a cut-off mix. Every failure names the file.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from ..errors import GPTNeoError


class WriteError(GPTNeoError):
    """A user file could not be written; the old one (if any) is unchanged."""


def _failure(path: Path, exc: OSError) -> WriteError:
    return WriteError(
        f"cannot write {path}: {exc.strerror or exc}; "
        f"{'the old file is unchanged' if path.exists() else 'nothing was written'}"
    )


class AtomicTextFile:
    """A UTF-8 text file that replaces `path` only when `commit()` is called."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        if self.path.is_dir():
            raise ValueError(f"{path} is a directory; give a file name")
        try:
            fd, temp = tempfile.mkstemp(
                prefix=f".{self.path.name}.", suffix=".partial", dir=self.path.parent
            )
        except OSError as exc:  # a path that cannot be written at all: a usage error
            raise ValueError(f"cannot write {path}: {exc.strerror or exc}") from None
        self._temp = Path(temp)
        self._handle = os.fdopen(fd, "w", encoding="utf-8", newline="")

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        try:
            return self._handle.write(text)
        except OSError as exc:
            self.discard()
            raise _failure(self.path, exc) from None

    def flush(self) -> None:
        try:
            self._handle.flush()
        except OSError as exc:
            self.discard()
            raise _failure(self.path, exc) from None

    def commit(self) -> None:
        """Put the written text in place of the old file (keeping the old file's mode)."""
        try:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            os.chmod(self._temp, _mode_for(self.path))
            os.replace(self._temp, self.path)
        except OSError as exc:
            self.discard()
            raise _failure(self.path, exc) from None

    def discard(self) -> None:
        """Drop what was written; the old file stays as it was."""
        with contextlib.suppress(OSError, ValueError):
            self._handle.close()
        with contextlib.suppress(OSError):
            self._temp.unlink()


def _mode_for(path: Path) -> int:
    """The old file's permissions, or what a plain open() would have created."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` all or nothing; return the path written."""
    out = AtomicTextFile(path)
    out.write(text)
    out.commit()
    return out.path
