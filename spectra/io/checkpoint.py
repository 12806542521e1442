"""Open a safetensors checkpoint lazily: names, shapes and dtypes from the headers, one tensor at a time on demand.

Layouts: a `.safetensors` file; a folder with `model.safetensors`; a folder with `model.safetensors.index.json` and
its shards (Hugging Face); a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`, format
"peft-adapter", interpreted by spectra.plan.adapter); a hub id `org/name[@revision]`, when no such path exists, resolved
from the local Hugging Face cache (spectra.io.hub). Tensors are read with plain positioned reads into a fresh tensor
rather than through a memory map, so resident memory stays bounded by the tensors in flight, whatever the
checkpoint's size. Pickle checkpoints (`.bin`, `.pt`) are refused, never unpickled.

Hostile or broken inputs either open correctly or raise one CheckpointError line naming the file (and tensor or
index entry): files found in a folder must resolve inside it (a shard index cannot point at `../x` or `/etc/passwd`,
nor a symlink lead out), only regular files are opened, and headers are validated as `spectra.io.header` describes.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from types import TracebackType

import torch

from spectra.errors import CheckpointError
from spectra.io.header import (
    _PICKLE_HINT,
    TensorEntry,
    is_pickle_name,
    kind_of,
    quoted,
    read_header,
    read_weight_map,
    shown,
    stat_path,
)
from spectra.io.hub import parse_hub_id, resolve_hub_id
from spectra.io.tensors import Handles, read_tensor
from spectra.names import ADAPTER_CONFIG, ADAPTER_WEIGHTS, INDEX_NAME, SINGLE_NAME, printable
from spectra.records import CheckpointInfo

log = logging.getLogger(__name__)


class Checkpoint:
    """An open checkpoint: the tensor index from the headers, and `read(name)` for one tensor at a time."""

    def __init__(self, path: str, fmt: str, entries: dict[str, TensorEntry], location: Path | None = None) -> None:
        self.path = path  # as the user gave it (a path or a hub id)
        self.format = fmt
        self.entries = entries
        self.location = location if location is not None else Path(path)  # the file or folder actually read
        self.handles = Handles()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.handles.close()

    @property
    def info(self) -> CheckpointInfo:
        dtypes = sorted({e.dtype_name for e in self.entries.values()})
        nbytes = sum(e.nbytes for e in self.entries.values())
        return CheckpointInfo(self.path, self.format, len(self.entries), nbytes, tuple(dtypes))

    def read(self, name: str, rows: tuple[int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Return tensor `name` (or its rows `rows` = (start, stop) along the first axis) in its storage dtype, on
        the CPU, read from disk now, into `out` when given (see `spectra.io.tensors.read_tensor`).

        Raises:
            CheckpointError: the file cannot be read or ends early.
        """
        return read_tensor(self.entries[name], rows, out, self.handles)


def open_checkpoint(path: str, *, download: bool = False) -> Checkpoint:
    """Open a checkpoint's index without reading tensor data.

    Args:
        path: a `.safetensors` file, a folder holding `model.safetensors`, a shard index or a PEFT adapter, the
            shard index file itself, or a hub id `org/name[@revision]` (when no such path exists) found in the local
            Hugging Face cache.
        download: let huggingface_hub download a hub id that is not cached.

    Files found in a folder (the index, its shards, `model.safetensors`, the adapter's files) must be regular files
    inside that folder once symlinks are resolved, or, for a Hugging Face cache snapshot (`…/snapshots/<commit>`),
    inside its repository's `blobs` folder, where the snapshot's links point.

    Raises:
        CheckpointError: missing path or hub id, pickle checkpoint, not a regular file or folder, unreadable, corrupt
            or truncated file, a file outside the folder, incomplete or inconsistent shard set.
    """
    p = Path(path)
    st = stat_path(p)
    if st is None:
        if parse_hub_id(path) is None:
            raise CheckpointError(f"{shown(path)}: no such file or folder")
        p = resolve_hub_id(path, download=download)
        st = stat_path(p)
        if st is None:
            raise CheckpointError(f"{shown(path)}: the hub cache gave {shown(p)}, which does not exist; fetch it again")
    if stat.S_ISREG(st.st_mode) and p.name == INDEX_NAME:  # the index of a sharded folder
        return Checkpoint(path, "sharded", _read_index(_Folder(p.parent)), p.parent)
    if stat.S_ISREG(st.st_mode):
        adapter = p.name == ADAPTER_WEIGHTS and _Folder(p.parent).has(ADAPTER_CONFIG)
        return Checkpoint(
            path, "peft-adapter" if adapter else "safetensors", read_header(p), p.parent if adapter else p
        )
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{shown(path)}: is {kind_of(st.st_mode)}, not a checkpoint file or folder")
    folder = _Folder(p)
    has_index, has_single = folder.has(INDEX_NAME), folder.has(SINGLE_NAME)
    if folder.has(ADAPTER_CONFIG) and not has_single and not has_index:
        return Checkpoint(path, "peft-adapter", read_header(_adapter_weights(folder)), p)
    if has_index:
        return Checkpoint(path, "sharded", _read_index(folder), p)
    if has_single:
        return Checkpoint(path, "folder", read_header(p / SINGLE_NAME), p)
    names = folder.names()
    files = [name for name in names if name.endswith(".safetensors")]
    if len(files) == 1 and folder.has(files[0]):
        return Checkpoint(path, "folder", read_header(p / files[0]), p)
    raise CheckpointError(_explain_folder(p, files, names))


class _Folder:
    """A folder the user named, and where the files found in it may live once symlinks are resolved: inside it, or,
    for a Hugging Face cache snapshot, in the repository's blobs folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        real = Path(os.path.realpath(folder))
        roots = [real]
        if real.parent.name == "snapshots":
            roots.append(Path(os.path.realpath(real.parent.parent / "blobs")))
        self.roots = tuple(roots)

    def member(self, name: str, source: Path | None = None, entry: str | None = None) -> Path | None:
        """The path of `name` in the folder if something is there (None if not), after checking that it is a regular
        file within the roots. `source` and `entry`: the index and the weight_map entry that named it, for messages.

        Raises:
            CheckpointError: not a regular file, outside the folder, or cannot be examined.
        """
        path = self.folder / name
        st = stat_path(path)
        if st is None:
            return None
        where = (
            f"{shown(source)}: weight_map entry {quoted(entry)} names {quoted(name)}, which"
            if source is not None and entry is not None
            else f"{shown(path)}:"
        )
        real = Path(os.path.realpath(path))
        if not any(real.is_relative_to(root) for root in self.roots):
            raise CheckpointError(
                f"{where} resolves to {shown(real)}, outside {shown(self.folder)}; spectra reads only files inside the "
                "checkpoint folder: copy the file in, or pass the file itself"
            )
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{where} is {kind_of(st.st_mode)}, not a regular file; replace it with the file")
        return path

    def has(self, name: str) -> bool:
        return self.member(name) is not None

    def names(self) -> list[str]:
        """The names in the folder, sorted."""
        try:
            with os.scandir(self.folder) as listing:
                return sorted(entry.name for entry in listing)
        except OSError as exc:
            raise CheckpointError(
                f"{shown(self.folder)}: cannot list the folder ({exc.strerror or type(exc).__name__}); check its "
                "permissions"
            ) from None


def _adapter_weights(folder: _Folder) -> Path:
    weights = folder.member(ADAPTER_WEIGHTS)
    if weights is not None:
        return weights
    if stat_path(folder.folder / "adapter_model.bin") is not None:
        raise CheckpointError(
            f"{shown(folder.folder)}: the adapter's weights are a pickle (adapter_model.bin), which spectra never "
            "unpickles; re-save it with peft: PeftModel.from_pretrained(base, dir).save_pretrained(out, "
            "safe_serialization=True)"
        )
    raise CheckpointError(
        f"{shown(folder.folder)}: {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}; copy the adapter's weights here"
    )


def _explain_folder(folder: Path, files: list[str], names: list[str]) -> str:
    if files:
        listed = ", ".join(printable(f) for f in files[:3])
        return f"{shown(folder)}: several .safetensors ({listed}, ...), no {INDEX_NAME}; pass one file or add an index"
    pickles = [name for name in names if is_pickle_name(name)]
    if pickles:
        return f"{shown(folder)}: only pickle weights ({printable(pickles[0])}); {_PICKLE_HINT}"
    return f"{shown(folder)}: no model.safetensors, {INDEX_NAME} or adapter_config.json in this folder"


def _read_index(folder: _Folder) -> dict[str, TensorEntry]:
    """The tensors of a sharded checkpoint: every shard the index names, each read once.

    A tensor in two shards is refused (which copy is meant is ambiguous), as is one the index places in a shard that
    lacks it. Tensors a shard holds beyond those the index lists are kept, as transformers keeps them (it loads every
    tensor of every listed shard).
    """
    index = folder.folder / INDEX_NAME
    weight_map = read_weight_map(index)
    real_of: dict[str, Path] = {}  # shard name as listed -> the file it resolves to
    first: dict[Path, str] = {}  # resolved file -> the first name it is listed under
    for name, shard in weight_map.items():
        if shard in real_of:
            continue
        path = folder.member(shard, index, name)
        if path is None:
            raise CheckpointError(
                f"{shown(index)}: shard {quoted(shard)} (holding {quoted(name)}) is missing; download the complete "
                "checkpoint"
            )
        real_of[shard] = Path(os.path.realpath(path))
        first.setdefault(real_of[shard], shard)
    entries: dict[str, TensorEntry] = {}
    found_in: dict[str, Path] = {}
    for real, shard in sorted(first.items(), key=lambda item: item[1]):
        for name, entry in read_header(folder.folder / shard).items():
            if name in found_in:
                listed = f"the index names {quoted(weight_map[name])}" if name in weight_map else "not in the index"
                raise CheckpointError(
                    f"{shown(index)}: tensor {quoted(name)} is in two shards, {quoted(first[found_in[name]])} and "
                    f"{quoted(shard)} ({listed}); which copy is meant is ambiguous: remove one and re-save"
                )
            found_in[name] = real
            entries[name] = entry
    for name, shard in weight_map.items():
        if name not in found_in:
            raise CheckpointError(
                f"{shown(index)}: tensor {quoted(name)} is listed in the index but not in its shard {quoted(shard)}; "
                "download the complete checkpoint, or regenerate the index"
            )
        if found_in[name] != real_of[shard]:
            raise CheckpointError(
                f"{shown(index)}: the index puts tensor {quoted(name)} in shard {quoted(shard)}, but it is in "
                f"{quoted(first[found_in[name]])}; regenerate the index"
            )
    return entries
