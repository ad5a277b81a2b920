"""Writing a file so that a reader sees either the old file or the whole new one.

Checkpoints, ONNX exports, downloaded weights and kept dead letters are all written the same
way: to a temporary file in the destination's folder (so the rename stays on one file
system), flushed to disk, then renamed over the destination. A failure at any point
removes the temporary file and leaves the destination as it was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_write(
    path: Path, mode: str = "wb", *, suffix: str = ".tmp", durable: bool = True
) -> Iterator[IO[Any]]:
    """Yield an open temporary file that becomes ``path`` when the block ends without an
    error. ``durable``: fsync the file and the folder, so a crash after the rename can lose
    neither the content nor the name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, mode) as out:
            yield out
            out.flush()
            if durable:
                os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_folder(path.parent)


@contextlib.contextmanager
def atomic_path(path: Path, *, suffix: str = ".tmp") -> Iterator[Path]:
    """For writers that want a file name rather than a file object (an exporter that opens
    the file itself): yield a temporary path that becomes ``path`` if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


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
