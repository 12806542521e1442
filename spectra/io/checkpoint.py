"""Open a safetensors checkpoint lazily: names, shapes and dtypes from the headers, one tensor at a time on demand.

Layouts: a `.safetensors` file; a folder with `model.safetensors`; a folder with `model.safetensors.index.json` and
its shards (Hugging Face); a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`, format
"peft-adapter", interpreted by spectra.plan.adapter); a hub id `org/name[@revision]`, when no such path exists, resolved
from the local Hugging Face cache (spectra.io.hub). Tensors are read with plain positioned reads into a fresh tensor
rather than through a memory map, so resident memory stays bounded by the tensors in flight, whatever the
checkpoint's size. Pickle checkpoints (`.bin`, `.pt`) are refused, never unpickled.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import TracebackType

import torch

from spectra.errors import CheckpointError
from spectra.io.header import _PICKLE_HINT, PICKLE_SUFFIXES, TensorEntry, read_header
from spectra.io.hub import parse_hub_id, resolve_hub_id
from spectra.io.tensors import Handles, read_tensor
from spectra.names import ADAPTER_CONFIG, ADAPTER_WEIGHTS, INDEX_NAME, SINGLE_NAME
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
        path: a `.safetensors` file, a folder holding `model.safetensors`, a shard index or a PEFT adapter, or a hub
            id `org/name[@revision]` (when no such path exists) found in the local Hugging Face cache.
        download: let huggingface_hub download a hub id that is not cached.

    Raises:
        CheckpointError: missing path or hub id, pickle checkpoint, corrupt or truncated file, incomplete shard set.
    """
    p = Path(path)
    if not p.exists():
        if parse_hub_id(path) is None:
            raise CheckpointError(f"{path}: no such file or folder")
        p = resolve_hub_id(path, download=download)
    if p.is_file():
        fmt = "peft-adapter" if p.name == ADAPTER_WEIGHTS and (p.parent / ADAPTER_CONFIG).is_file() else "safetensors"
        return Checkpoint(path, fmt, read_header(p), p.parent if fmt == "peft-adapter" else p)
    if (p / ADAPTER_CONFIG).is_file() and not (p / SINGLE_NAME).is_file() and not (p / INDEX_NAME).is_file():
        return Checkpoint(path, "peft-adapter", read_header(_adapter_weights(p)), p)
    if (p / INDEX_NAME).is_file():
        return Checkpoint(path, "sharded", _read_index(p / INDEX_NAME), p)
    if (p / SINGLE_NAME).is_file():
        return Checkpoint(path, "folder", read_header(p / SINGLE_NAME), p)
    files = sorted(p.glob("*.safetensors"))
    if len(files) == 1:
        return Checkpoint(path, "folder", read_header(files[0]), p)
    raise CheckpointError(_explain_folder(p, files))


def _adapter_weights(folder: Path) -> Path:
    if (folder / ADAPTER_WEIGHTS).is_file():
        return folder / ADAPTER_WEIGHTS
    if (folder / "adapter_model.bin").is_file():
        raise CheckpointError(
            f"{folder}: the adapter's weights are a pickle (adapter_model.bin), which spectra never unpickles; "
            "re-save it with peft: PeftModel.from_pretrained(base, dir).save_pretrained(out, safe_serialization=True)"
        )
    raise CheckpointError(f"{folder}: {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}; copy the adapter's weights here")


def _explain_folder(folder: Path, files: list[Path]) -> str:
    if files:
        names = ", ".join(f.name for f in files[:3])
        return f"{folder}: several .safetensors ({names}, ...), no {INDEX_NAME}; pass one file or add an index"
    pickles = [f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES]
    if pickles:
        return f"{folder}: only pickle weights ({pickles[0]}); {_PICKLE_HINT}"
    return f"{folder}: no model.safetensors, {INDEX_NAME} or adapter_config.json in this folder"


def _read_index(index: Path) -> dict[str, TensorEntry]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert isinstance(weight_map, dict)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AssertionError):
        raise CheckpointError(f"{index}: not a valid shard index (needs a JSON object with 'weight_map')") from None
    entries: dict[str, TensorEntry] = {}
    for shard in sorted(set(weight_map.values())):
        file = index.parent / str(shard)
        if not file.is_file():
            raise CheckpointError(f"{index}: shard {shard} is missing; download the complete checkpoint")
        entries.update(read_header(file))
    missing = [name for name in weight_map if name not in entries]
    if missing:
        raise CheckpointError(f"{index}: tensor {missing[0]!r} is listed in the index but not in its shard")
    return entries
