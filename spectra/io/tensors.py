"""Read one tensor, or a block of its rows, from its byte range with positioned reads into a caller's buffer.

No memory map (mapped pages count in resident memory). Files are opened through a small per-process handle cache,
so a job that names a tensor by its `TensorEntry` (file, offset, dtype, shape) can be read in any process.
"""

from __future__ import annotations

import io
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Final

import torch

from spectra.errors import CheckpointError
from spectra.io.header import DTYPES, TensorEntry, open_regular, quoted, shown

MAX_OPEN: Final = 64  # open files kept per cache (a sharded 405B checkpoint has ~190 shards)


class Handles:
    """Open read-only file handles by path, least recently used closed first. One per thread or process: a handle
    has one file position."""

    def __init__(self, limit: int = MAX_OPEN) -> None:
        self.limit = limit
        self._open: OrderedDict[Path, io.BufferedReader] = OrderedDict()

    def get(self, file: Path) -> io.BufferedReader:
        handle = self._open.get(file)
        if handle is None:
            fd, _ = open_regular(file)  # never blocks: a FIFO swapped in since the header was read is refused
            handle = os.fdopen(fd, "rb")
            self._open[file] = handle
            while len(self._open) > self.limit:
                self._open.popitem(last=False)[1].close()
        self._open.move_to_end(file)
        return handle

    def __len__(self) -> int:
        return len(self._open)

    def close(self) -> None:
        for handle in self._open.values():
            handle.close()
        self._open.clear()


def read_tensor(
    entry: TensorEntry,
    rows: tuple[int, int] | None = None,
    out: torch.Tensor | None = None,
    handles: Handles | None = None,
) -> torch.Tensor:
    """Return the tensor of `entry` (or its rows `rows` = (start, stop) along the first axis) in its storage dtype,
    on the CPU, read from disk now, into `out` when given (a contiguous tensor of the storage dtype and the right
    number of elements, e.g. a reused chunk buffer).

    Raises:
        CheckpointError: the file cannot be read or ends early.
    """
    name = entry.name
    dtype = DTYPES[entry.code][0]
    shape, start, nbytes = entry.shape, entry.start, entry.nbytes
    if rows is not None:
        row_bytes = entry.nbytes // entry.shape[0] if entry.shape and entry.shape[0] else 0
        shape = (rows[1] - rows[0], *entry.shape[1:])
        start, nbytes = entry.start + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes
    if out is None:
        out = torch.empty(shape, dtype=dtype)
    else:
        assert out.dtype == dtype and out.is_contiguous() and out.numel() == math.prod(shape), "bad out buffer"
        out = out.view(shape)
    buffer = out.reshape(-1).view(torch.uint8).numpy().data if nbytes else memoryview(b"")  # 0-d: reshape first
    own = handles is None
    cache = Handles(1) if own or handles is None else handles
    try:
        handle = cache.get(entry.file)
        handle.seek(start)
        got = handle.readinto(buffer) if nbytes else 0
    except OSError as exc:
        raise CheckpointError(f"{shown(entry.file)}: cannot read tensor {quoted(name)}: {exc}") from None
    finally:
        if own:
            cache.close()
    if got != nbytes:
        raise CheckpointError(
            f"{shown(entry.file)}: tensor {quoted(name)} is cut short (truncated?); re-download or re-save it"
        )
    return out
