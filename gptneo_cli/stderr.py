"""Hiding what native code writes straight to file descriptor 2 (the tokenizers library's
panic messages, Ray's C++ core logging), which Python's sys.stderr cannot catch."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def native_stderr_hidden() -> Iterator[None]:
    """Point descriptor 2 at the null device for the block, then back.

    Flush sys.stderr first if its buffer must come out before; with no descriptor 2
    (closed) there is nothing to hide and the block just runs.
    """
    try:
        saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
