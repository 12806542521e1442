"""safetensors headers: parse and validate one file's header into TensorEntry records, reading no tensor data."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from spectra.errors import CheckpointError

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
