"""Open a safetensors checkpoint lazily: names, shapes and dtypes from the headers, one tensor at a time on demand.

Layouts: a `.safetensors` file; a folder with `model.safetensors`; a folder with `model.safetensors.index.json` and
its shards (Hugging Face); a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`, format
"peft-adapter", interpreted by spectra.plan.adapter); a hub id `org/name[@revision]`, when no such path exists, resolved
from the local Hugging Face cache (spectra.io.hub). Tensors are read with plain positioned reads into a fresh tensor
rather than through a memory map, so resident memory stays bounded by the tensors in flight, whatever the
checkpoint's size. Pickle checkpoints (`.bin`, `.pt`) are refused, never unpickled.
"""

from __future__ import annotations

import io
import json
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch

from spectra.errors import CheckpointError
from spectra.io.hub import parse_hub_id, resolve_hub_id
from spectra.names import ADAPTER_CONFIG, ADAPTER_WEIGHTS, INDEX_NAME, SINGLE_NAME
from spectra.records import CheckpointInfo

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100 * 2**20

# safetensors dtype code -> (torch dtype, short name used in records and reports)
DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "F64": (torch.float64, "f64"),
    "F32": (torch.float32, "f32"),
    "F16": (torch.float16, "f16"),
    "BF16": (torch.bfloat16, "bf16"),
    "F8_E4M3": (torch.float8_e4m3fn, "f8_e4m3"),
    "F8_E5M2": (torch.float8_e5m2, "f8_e5m2"),
    "I64": (torch.int64, "i64"),
    "I32": (torch.int32, "i32"),
    "I16": (torch.int16, "i16"),
    "I8": (torch.int8, "i8"),
    "U8": (torch.uint8, "u8"),
    "BOOL": (torch.bool, "bool"),
}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """Where one tensor lives: file, byte range of its data, dtype code and shape."""

    name: str
    shape: tuple[int, ...]
    code: str  # safetensors dtype code, e.g. "BF16"
    file: Path
    start: int  # absolute byte offset of the data in `file`
    nbytes: int

    @property
    def dtype_name(self) -> str:
        return DTYPES[self.code][1] if self.code in DTYPES else self.code.lower()

    @property
    def is_float(self) -> bool:
        return self.code in FLOAT_CODES


class Checkpoint:
    """An open checkpoint: the tensor index from the headers, and `read(name)` for one tensor at a time."""

    def __init__(self, path: str, fmt: str, entries: dict[str, TensorEntry], location: Path | None = None) -> None:
        self.path = path  # as the user gave it (a path or a hub id)
        self.format = fmt
        self.entries = entries
        self.location = location if location is not None else Path(path)  # the file or folder actually read
        self._handles: dict[Path, io.BufferedReader] = {}

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    @property
    def info(self) -> CheckpointInfo:
        dtypes = sorted({e.dtype_name for e in self.entries.values()})
        nbytes = sum(e.nbytes for e in self.entries.values())
        return CheckpointInfo(self.path, self.format, len(self.entries), nbytes, tuple(dtypes))

    def read(self, name: str, rows: tuple[int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Return tensor `name` (or its rows `rows` = (start, stop) along the first axis) in its storage dtype, on
        the CPU, read from disk now, into `out` when given (a contiguous tensor of the storage dtype and the right
        number of elements, e.g. a reused chunk buffer).

        Raises:
            CheckpointError: the file cannot be read or ends early.
        """
        entry = self.entries[name]
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
        buffer = out.view(torch.uint8).reshape(-1).numpy().data if nbytes else memoryview(b"")
        try:
            handle = self._handles.get(entry.file) or self._open(entry.file)
            handle.seek(start)
            got = handle.readinto(buffer) if nbytes else 0
        except OSError as exc:
            raise CheckpointError(f"{entry.file}: cannot read tensor {name!r}: {exc}") from None
        if got != nbytes:
            raise CheckpointError(f"{entry.file}: tensor {name!r} is cut short (truncated?); re-download or re-save it")
        return out

    def _open(self, file: Path) -> io.BufferedReader:
        handle = open(file, "rb")  # noqa: SIM115 - kept open across reads, closed in close()
        self._handles[file] = handle
        return handle


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


_PICKLE_HINT = (
    "spectra never unpickles checkpoints (unsafe); convert it to safetensors first, e.g. with "
    "transformers: AutoModel.from_pretrained(dir).save_pretrained(out, safe_serialization=True)"
)


def read_header(file: Path) -> dict[str, TensorEntry]:
    """Parse and validate one safetensors header; return its tensors. Reads only the header bytes.

    Raises:
        CheckpointError: the file is a pickle, not safetensors, or shorter than its header says.
    """
    if file.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(f"{file}: pickle checkpoint refused; {_PICKLE_HINT}")
    size = file.stat().st_size
    try:
        with open(file, "rb") as fh:
            head = fh.read(8)
            (n_header,) = struct.unpack("<Q", head) if len(head) == 8 else (-1,)
            text = fh.read(n_header) if 2 <= n_header <= min(size - 8, MAX_HEADER_BYTES) else b""
            header = json.loads(text) if text[:1] == b"{" else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read: {exc}") from None
    if header is None:
        raise CheckpointError(_explain_not_safetensors(file, head, size))
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: not a safetensors file (header is not a JSON object)")
    data_start = 8 + n_header
    entries = {}
    for name, meta in header.items():
        if name != "__metadata__":
            entries[name] = _entry(file, name, meta, data_start, size)
    return entries


def _explain_not_safetensors(file: Path, head: bytes, size: int) -> str:
    if head[:2] == b"PK" or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05"):
        return f"{file}: this is a pickle/zip checkpoint, not safetensors; {_PICKLE_HINT}"
    if size < 8:
        return f"{file}: {size} bytes, too short to be a safetensors file"
    return f"{file}: not a safetensors file (no valid header; truncated, or another format?)"


def _entry(file: Path, name: str, meta: object, data_start: int, size: int) -> TensorEntry:
    try:
        assert isinstance(meta, dict) and isinstance(meta["dtype"], str)
        code, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
        assert isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
        assert all(type(d) is int and d >= 0 for d in [*shape, *offsets])  # bools and floats are not sizes
        shape, (begin, end) = tuple(shape), offsets
    except (AssertionError, KeyError, TypeError, ValueError):
        raise CheckpointError(f"{file}: tensor {name!r} has a malformed header entry; the file is corrupt") from None
    if code not in DTYPES:
        raise CheckpointError(f"{file}: tensor {name!r} has dtype {code}, which spectra cannot read")
    itemsize = torch.empty((), dtype=DTYPES[code][0]).element_size()
    if end - begin != math.prod(shape) * itemsize or begin < 0:
        raise CheckpointError(f"{file}: tensor {name!r}: header size does not match its shape; the file is corrupt")
    if data_start + end > size:
        raise CheckpointError(
            f"{file}: tensor {name!r} extends past the end of the file (truncated: {size} of "
            f"{data_start + end} bytes); re-download or re-save it"
        )
    return TensorEntry(name, shape, code, file, data_start + begin, end - begin)


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
