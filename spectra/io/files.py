"""Atomic writes: a file appears whole or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from spectra.errors import SpectraError


def write_atomic(path: Path, text: str) -> Path:
    """Write `text` to `path` via a temp file in the same folder, fsync and os.replace: never a half-written file.

    Creates missing parent folders; the file gets the permissions `open()` would give it.

    Raises:
        SpectraError: the file cannot be written (permissions, disk full, ...).
    """
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise SpectraError(f"{path}: cannot write ({exc.strerror or exc}); check the folder is writable") from None
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
