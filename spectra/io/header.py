"""safetensors headers and shard indexes: parse and validate them into TensorEntry records, reading no tensor data.

Every file is stat-ed before it is opened and only regular files are opened (non-blocking, so a FIFO or device
swapped in between cannot hang a run); every size is checked against the file before anything is allocated. A
header is accepted when the `safetensors` package would accept it (strict UTF-8 JSON, one `__metadata__` mapping
strings to strings, shapes and offsets of unsigned 64-bit integers, data ranges that tile the data section from its
first to its last byte: no overlap, no gap, nothing after it) and, stricter than it, when no key appears twice and no
name holds a lone surrogate. Anything else is a CheckpointError: one line naming the file, the tensor or entry, and
what to do. Names and paths in messages pass through `spectra.names.printable`.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final

import torch

from spectra.errors import CheckpointError
from spectra.names import printable

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_HEADER_BYTES: Final = 100 * 2**20  # the safetensors limit
MAX_INDEX_BYTES: Final = 100 * 2**20  # a shard index (a 405B model's is ~100 KiB)
INT64_MAX: Final = 2**63 - 1
MAX_SHOWN: Final = 200  # characters of a name shown in a message
MAX_INT_DIGITS: Final = 64  # longer integer literals are refused before int() sees them (sizes fit in 20 digits)

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
ITEMSIZE: dict[str, int] = {code: dtype.itemsize for code, (dtype, _) in DTYPES.items()}


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
_CORRUPT = "the file is corrupt; re-download or re-save it"


def shown(path: Path | str) -> str:
    """A path for a one-line message: control characters and lone surrogates escaped."""
    return printable(os.fspath(path))


def quoted(text: str) -> str:
    """A name (tensor, key, shard) for a one-line message: quoted, control characters and lone surrogates escaped,
    the middle of a very long one elided."""
    if len(text) > MAX_SHOWN:
        return f"'{printable(text[: MAX_SHOWN // 2])}…{printable(text[-MAX_SHOWN // 4 :])}' ({len(text)} characters)"
    return f"'{printable(text)}'"


def is_pickle_name(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


# ---------------------------------------------------------------------------------------------------- files


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _hint(exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "check its permissions"
    if exc.errno == errno.ELOOP:
        return "a symlink points back at itself; fix the link"
    return "check the path"


def stat_path(path: Path) -> os.stat_result | None:
    """`os.stat(path)` following symlinks, or None when nothing is there (a dangling link counts as nothing).

    Raises:
        CheckpointError: the path cannot be examined (permission denied, symlink loop, NUL in the name).
    """
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise CheckpointError(f"{shown(path)}: cannot access it ({_reason(exc)}); {_hint(exc)}") from None
    except ValueError:  # an embedded NUL, or a lone surrogate the file system encoding cannot express
        raise CheckpointError(f"{shown(path)}: not a valid file name (NUL or unencodable character)") from None


def kind_of(mode: int) -> str:
    """What a stat mode is, for messages: 'a regular file', 'a folder', 'a FIFO (named pipe)', ..."""
    kinds = (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((what for test, what in kinds if test(mode)), "not a regular file")


def require_regular(path: Path, mode: int) -> None:
    """Raises CheckpointError unless `mode` is a regular file's."""
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{shown(path)}: is {kind_of(mode)}, not a file spectra can read; pass a regular file")


_OPEN_FLAGS: Final = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)


def open_regular(path: Path) -> tuple[int, int]:
    """Open a regular file read-only; return (file descriptor, size). Anything else is refused before it is opened,
    and the open never blocks (O_NONBLOCK), even if a FIFO replaced the file since it was examined.

    Raises:
        CheckpointError: missing, not a regular file, or cannot be opened.
    """
    st = stat_path(path)
    if st is None:
        raise CheckpointError(f"{shown(path)}: no such file")
    require_regular(path, st.st_mode)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise CheckpointError(f"{shown(path)}: cannot open it ({_reason(exc)}); {_hint(exc)}") from None
    try:
        st = os.fstat(fd)
        require_regular(path, st.st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def _pread(fd: int, n: int, offset: int) -> bytes:
    """Up to `n` bytes at `offset`; fewer only at the end of the file."""
    parts = []
    while n > 0:
        part = os.pread(fd, n, offset)
        if not part:
            break
        parts.append(part)
        n -= len(part)
        offset += len(part)
    return b"".join(parts)


def read_small_file(path: Path, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (a shard index, a config).

    Raises:
        CheckpointError: missing, not a regular file, unreadable, or larger than `limit`.
    """
    fd, size = open_regular(path)
    try:
        if size > limit:
            raise CheckpointError(f"{shown(path)}: {size} bytes, too large for a {what} (at most {limit})")
        return _pread(fd, size, 0)
    except OSError as exc:
        raise CheckpointError(f"{shown(path)}: cannot read it ({_reason(exc)}); {_hint(exc)}") from None
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------- JSON


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class _LongInteger(Exception):
    def __init__(self, digits: int) -> None:
        super().__init__(digits)
        self.digits = digits


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def _bounded_int(text: str) -> int | float:
    if len(text) > MAX_INT_DIGITS:  # int() is quadratic in the digits, and limited (or not) by the interpreter
        raise _LongInteger(len(text))
    if text[0] == "-":  # a float, as JSON readers without signed integers see it: -0 is no size either
        return float(text)
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:24]} out of range")
    return value


def _no_constant(text: str) -> None:
    raise ValueError(f"{text} is not JSON")


def parse_json(data: bytes, file: Path, what: str) -> object:
    """Strict JSON: UTF-8, no duplicate keys, bounded nesting and integer literals.

    Raises:
        CheckpointError: naming `file` and `what` ("header", "shard index").
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{shown(file)}: the {what} is not valid UTF-8 (byte {exc.start}); {_CORRUPT}") from None
    try:
        return json.loads(
            text,
            object_pairs_hook=_unique_object,
            parse_int=_bounded_int,
            parse_float=_finite_float,
            parse_constant=_no_constant,
        )
    except _DuplicateKey as dup:
        raise CheckpointError(
            f"{shown(file)}: key {quoted(dup.key)} appears twice in the {what} (which copy is meant is ambiguous); "
            f"{_CORRUPT}"
        ) from None
    except _LongInteger as big:
        raise CheckpointError(
            f"{shown(file)}: the {what} holds an integer of {big.digits} digits (sizes and offsets have at most 20); "
            f"{_CORRUPT}"
        ) from None
    except RecursionError:
        raise CheckpointError(f"{shown(file)}: the {what} is nested too deeply to be a {what}; {_CORRUPT}") from None
    except ValueError as exc:  # json.JSONDecodeError
        detail = printable(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise CheckpointError(f"{shown(file)}: the {what} is not valid JSON ({detail}); {_CORRUPT}") from None


def lone_surrogate(text: str) -> bool:
    """Whether `text` holds a lone surrogate (from a JSON escape like \\ud800): not Unicode text, not encodable."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# ---------------------------------------------------------------------------------------------------- headers


def read_header(file: Path) -> dict[str, TensorEntry]:
    """Parse and validate one safetensors header; return its tensors. Reads only the header bytes.

    Raises:
        CheckpointError: the file is a pickle, not a regular file, unreadable, not safetensors, malformed (see the
            module docstring), or shorter than its header says.
    """
    header, data_start, size = _header_json(file)
    return _entries(file, header, data_start, size)


def read_metadata(file: Path) -> dict[str, str] | None:
    """The header's `__metadata__` mapping (validated as read_header does), or None when it has none.

    Raises:
        CheckpointError: as read_header.
    """
    header, _, _ = _header_json(file)
    meta = header.get("__metadata__")
    _check_metadata(file, meta)
    assert meta is None or isinstance(meta, dict)  # _check_metadata: a string -> string mapping
    return None if meta is None else dict(meta)


def _header_json(file: Path) -> tuple[dict[str, object], int, int]:
    """(the header's JSON object, offset of the data, file size): read and checked to be a safetensors header."""
    if is_pickle_name(file.name):
        raise CheckpointError(f"{shown(file)}: pickle checkpoint refused; {_PICKLE_HINT}")
    fd, size = open_regular(file)
    try:
        head = _pread(fd, 8, 0)
        n_header = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        text = _pread(fd, n_header, 8) if 2 <= n_header <= min(size - 8, MAX_HEADER_BYTES) else b""
    except OSError as exc:
        raise CheckpointError(f"{shown(file)}: cannot read it ({_reason(exc)}); {_hint(exc)}") from None
    finally:
        os.close(fd)
    if len(text) != n_header or text.lstrip(b" \t\r\n")[:1] != b"{":
        raise CheckpointError(_explain_not_safetensors(file, head, size))
    header = parse_json(text, file, "header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{shown(file)}: not a safetensors file (header is not a JSON object)")
    return header, 8 + n_header, size


def _explain_not_safetensors(file: Path, head: bytes, size: int) -> str:
    if head[:2] == b"PK" or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05"):
        return f"{shown(file)}: this is a pickle/zip checkpoint, not safetensors; {_PICKLE_HINT}"
    if size < 8:
        return f"{shown(file)}: {size} bytes, too short to be a safetensors file"
    return f"{shown(file)}: not a safetensors file (no valid header; truncated, or another format?)"


def _entries(file: Path, header: dict[str, object], data_start: int, size: int) -> dict[str, TensorEntry]:
    entries = {}
    for name, meta in header.items():
        if name == "__metadata__":
            _check_metadata(file, meta)
            continue
        if lone_surrogate(name):
            raise CheckpointError(
                f"{shown(file)}: tensor name {quoted(name)} holds a lone surrogate escape, which is not Unicode text; "
                f"{_CORRUPT}"
            )
        entries[name] = _entry(file, name, meta, data_start, size)
    _check_layout(file, entries, data_start, size)
    return entries


def _check_metadata(file: Path, meta: object) -> None:
    """`__metadata__` is absent, null, or maps strings to strings (as the safetensors package requires)."""
    if meta is None:
        return
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{shown(file)}: the header's __metadata__ does not map strings to strings; {_CORRUPT}")
    if any(lone_surrogate(k) or lone_surrogate(v) for k, v in meta.items()):
        raise CheckpointError(f"{shown(file)}: the header's __metadata__ holds a lone surrogate escape; {_CORRUPT}")


def _shape_text(shape: list[int]) -> str:
    if len(shape) <= 8 and all(d <= INT64_MAX for d in shape):
        return "[" + ", ".join(map(str, shape)) + "]"
    return f"of {len(shape)} dimensions"


_NOT_SIZES: Final = -1
_TOO_LARGE: Final = -2


def _numel(shape: list[object]) -> int:
    """Elements in `shape`; _NOT_SIZES if a size is not a non-negative integer (bools and floats are not sizes);
    _TOO_LARGE if the product of its non-zero sizes exceeds int64 (torch cannot describe it: its strides would
    overflow). Stops as soon as the running product is too large: no huge integers are formed."""
    n, empty = 1, False
    for d in shape:
        if type(d) is not int or d < 0:
            return _NOT_SIZES
        if d > 1:
            n *= d
            if n > INT64_MAX:
                return _TOO_LARGE
        elif d == 0:
            empty = True
    return 0 if empty else n


def _entry(file: Path, name: str, meta: object, data_start: int, size: int) -> TensorEntry:
    if not isinstance(meta, dict):
        meta = {}
    code, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    dims: list[Any] = shape if isinstance(shape, list) else []
    numel = _numel(dims) if isinstance(shape, list) else _NOT_SIZES
    if (
        numel == _NOT_SIZES
        or not isinstance(code, str)
        or not isinstance(offsets, list)
        or len(offsets) != 2
        or _numel(offsets) == _NOT_SIZES
    ):
        raise CheckpointError(
            f"{_where(file, name)} has a malformed header entry (needs dtype, shape and data_offsets [begin, end] of "
            f"non-negative integers); {_CORRUPT}"
        )
    if len(meta) > 3 and (problem := _extra_fields_problem(meta)):
        raise CheckpointError(f"{_where(file, name)}: {problem}; {_CORRUPT}")
    if code not in DTYPES:
        raise CheckpointError(f"{_where(file, name)} has dtype {quoted(code)}, which spectra cannot read")
    if numel == _TOO_LARGE:
        raise CheckpointError(
            f"{_where(file, name)}: shape {_shape_text(dims)} has more than 2^63 elements; {_CORRUPT}"
        )
    begin, end = offsets
    nbytes = numel * ITEMSIZE[code]
    if end - begin != nbytes:
        raise CheckpointError(
            f"{_where(file, name)}: header size does not match its shape ({code} {_shape_text(dims)} is {nbytes} "
            f"bytes, data_offsets span {end - begin}); {_CORRUPT}"
        )
    if data_start + end > size:
        raise CheckpointError(
            f"{_where(file, name)} extends past the end of the file (truncated: {size} of {data_start + end} bytes); "
            "re-download or re-save it"
        )
    return TensorEntry(name, tuple(dims), code, file, data_start + begin, nbytes)


def _where(file: Path, name: str) -> str:
    return f"{shown(file)}: tensor {quoted(name)}"


_KNOWN_FIELDS = frozenset({"dtype", "shape", "data_offsets"})
MAX_EXTRA_DEPTH: Final = 125  # the safetensors package reads at most 127 levels of nesting, 2 of them above a field


def _extra_fields_problem(meta: dict[str, object]) -> str | None:
    """Fields beyond dtype, shape and data_offsets are ignored, as the safetensors package ignores them, but held to
    what it can read: nesting within its limit, strings that are Unicode text."""
    for key, value in meta.items():
        if key not in _KNOWN_FIELDS:
            problem = "a lone surrogate escape" if lone_surrogate(key) else _value_problem(value, MAX_EXTRA_DEPTH)
            if problem is not None:
                return f"field {quoted(key)} holds {problem}"
    return None


def _value_problem(value: object, depth: int) -> str | None:
    if isinstance(value, str):
        return "a lone surrogate escape" if lone_surrogate(value) else None
    if isinstance(value, dict | list):
        if depth == 0:
            return f"more than {MAX_EXTRA_DEPTH} levels of nesting"
        items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        return next((p for item in items if (p := _value_problem(item, depth - 1)) is not None), None)
    return None


def _check_layout(file: Path, entries: dict[str, TensorEntry], data_start: int, size: int) -> None:
    """The data ranges tile the data section exactly, as the safetensors package requires: sorted by offsets, each
    begins where the previous ended (zero-byte tensors may share a position), and the last ends at the end of the
    file. Overlap (aliased bytes read as two tensors), gaps and trailing bytes are refused."""
    at, previous = data_start, ""
    for begin, end, name in sorted((e.start, e.start + e.nbytes, name) for name, e in entries.items()):
        if begin < at:
            raise CheckpointError(
                f"{shown(file)}: tensors {quoted(previous)} and {quoted(name)} overlap (their data_offsets share "
                f"bytes); {_CORRUPT}"
            )
        if begin > at:
            raise CheckpointError(
                f"{shown(file)}: {begin - at} bytes before tensor {quoted(name)} belong to no tensor (a gap in the "
                f"data_offsets); {_CORRUPT}"
            )
        at, previous = end, name
    if at != size:
        raise CheckpointError(
            f"{shown(file)}: {size - at} bytes after the last tensor's data belong to no tensor (the header does "
            f"not cover the file); {_CORRUPT}"
        )


# ---------------------------------------------------------------------------------------------------- shard index


def read_weight_map(index: Path) -> dict[str, str]:
    """The weight_map of a shard index (`model.safetensors.index.json`): tensor name -> shard file, validated.

    Every shard must be a relative path inside the index's folder (no absolute path, no `..`), not a pickle; that it
    exists, is a regular file and stays inside the folder once symlinks are resolved is checked by the caller.

    Raises:
        CheckpointError: the index is not a JSON object with a non-empty `weight_map` of strings to shard names.
    """
    doc = parse_json(read_small_file(index, MAX_INDEX_BYTES, "shard index"), index, "shard index")
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{shown(index)}: not a valid shard index (needs a JSON object with 'weight_map')")
    if not weight_map:
        raise CheckpointError(f"{shown(index)}: the shard index's weight_map lists no tensors; {_CORRUPT}")
    for name, shard in weight_map.items():
        entry = f"{shown(index)}: weight_map entry {quoted(name)}"
        if lone_surrogate(name):
            raise CheckpointError(f"{entry} holds a lone surrogate escape, which is not Unicode text; {_CORRUPT}")
        if not isinstance(shard, str):
            kind = type(shard).__name__ if shard is not None else "null"
            raise CheckpointError(f"{entry} is a {kind}, not a shard file name; {_CORRUPT}")
        if is_pickle_name(shard):
            raise CheckpointError(f"{entry} names shard {quoted(shard)}, a pickle: refused; {_PICKLE_HINT}")
        problem = shard_name_problem(shard)
        if problem is not None:
            raise CheckpointError(
                f"{entry} names shard {quoted(shard)}, {problem}; a shard must be a file in the folder that "
                "holds the index"
            )
    return weight_map


def shard_name_problem(shard: str) -> str | None:
    """Why `shard` cannot name a file inside the index's folder (lexically), or None."""
    if not shard or shard.endswith("/") or PurePosixPath(shard).parts in ((), (".",)):
        return "which is not a file name"
    if "\x00" in shard or lone_surrogate(shard):
        return "which holds a NUL or a lone surrogate"
    if os.path.isabs(shard):
        return "an absolute path"
    if ".." in PurePosixPath(shard).parts:
        return "which leads outside the folder ('..')"
    return None
