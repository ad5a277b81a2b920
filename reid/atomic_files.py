"""Writing a file so that a reader sees either the old file or the whole new one.

Checkpoints, ONNX exports, downloaded weights and kept dead letters are all written the same
way: to a temporary file in the destination's folder (so the rename stays on one file
system), then renamed over the destination; ``atomic_write`` also flushes it to disk first
(an ONNX export, a cache that is made again when missing, goes through ``atomic_path`` only).
A failure at any point removes the temporary file and leaves the destination as it was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_path(path: Path, *, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` that becomes ``path`` if the block succeeds
    (for writers that open the file themselves, like an exporter); removed if it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "wb", *, suffix: str = ".tmp") -> Iterator[IO[Any]]:
    """Yield an open temporary file that becomes ``path`` when the block ends without an
    error; the file and the folder are fsynced, so a crash after the rename can lose neither
    the content nor the name."""
    with atomic_path(path, suffix=suffix) as tmp, open(tmp, mode) as out:
        yield out
        out.flush()
        os.fsync(out.fileno())
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable; a no-op where folders cannot be opened."""
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
