"""Write a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors), atomically and streaming.

The tensor layout (keys, shapes, dtypes) is known before any factor is computed, so the safetensors header is
written first and each tensor's bytes go to their offset as soon as the tensor exists, in any order: memory holds
one tensor at a time, whatever the adapter's size. Everything is written into a hidden temporary folder next to
the output, which is renamed into place only when every tensor is there: an error or an interrupt leaves nothing
(the temporary folder is removed), and an existing output is replaced in one step where the system allows it.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from spectra.errors import OptionsError, SpectraError
from spectra.io.files import exchange
from spectra.io.header import DTYPES
from spectra.names import ADAPTER_CONFIG, ADAPTER_WEIGHTS, printable
from spectra.peft.layout import LORA_KEY, ConfigReader, adapter_key, factor_shapes

log = logging.getLogger(__name__)

ADAPTER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_CODES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}  # adapters
CODES = {dtype: code for code, (dtype, _) in DTYPES.items()}  # every dtype a safetensors file can hold


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor of the adapter file: its key, shape and dtype, known before its values are."""

    key: str  # e.g. "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32


def lora_layout(
    module: str,
    shape: tuple[int, int],
    r: int,
    dtype: torch.dtype = torch.float32,
    *,
    embedding: bool = False,
    transpose: bool = False,
    bias: bool = False,
) -> tuple[TensorSpec, ...]:
    """The tensors PEFT stores for one module's rank-r LoRA: lora_A, lora_B (and lora_B.bias with `bias`).

    Args:
        module: PEFT module name, e.g. "model.layers.0.self_attn.q_proj".
        shape: ΔW's shape as the module's weight is stored: (out, in); (in, out) for a fan_in_fan_out layer
            (GPT-2's Conv1D); (num_embeddings, embedding_dim) for an embedding.
        r: the module's rank, ≥ 1.
        dtype: storage dtype (see ADAPTER_DTYPES).
        embedding: an nn.Embedding (keys lora_embedding_A / lora_embedding_B, transposed factors).
        transpose: a fan_in_fan_out layer (the config must say fan_in_fan_out: true).
        bias: also store lora_B.bias (lora_bias: true; PEFT has no bias for embeddings).
    """
    a_shape, b_shape = factor_shapes(shape, r, transpose or embedding)
    specs = [
        TensorSpec(adapter_key(module, "lora_A", embedding), a_shape, dtype),
        TensorSpec(adapter_key(module, "lora_B", embedding), b_shape, dtype),
    ]
    if bias:
        specs.append(TensorSpec(adapter_key(module, "bias", embedding), (b_shape[0],), dtype))
    return tuple(specs)


def _header(
    layout: Sequence[TensorSpec], metadata: Mapping[str, str] | None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The safetensors header (padded to 8 bytes, as safetensors does) and key -> (data offset, nbytes); `metadata`
    None writes no __metadata__.

    Tensors are laid out by decreasing element size, then key, so every tensor's data is aligned to its dtype."""
    header: dict[str, Any] = {} if metadata is None else {"__metadata__": dict(metadata)}
    places: dict[str, tuple[int, int]] = {}
    offset = 0
    for spec in sorted(layout, key=lambda s: (-s.dtype.itemsize, s.key)):
        nbytes = math.prod(spec.shape) * spec.dtype.itemsize
        header[spec.key] = {
            "dtype": CODES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        places[spec.key] = (offset, nbytes)
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, places


class TensorFile:
    """One safetensors file written streaming: the header first (the layout is known), then each tensor of the
    layout once, in any order, at its offset; memory holds the tensor being written. `close` checks that every
    tensor was written and syncs the file; `abort` just closes it (the caller removes its temporary folder).

    Args:
        path: the file to create (it must not exist).
        layout: every tensor of the file (any dtype of spectra.io.header.DTYPES).
        metadata: the header's __metadata__ (strings), or None for none.

    Raises:
        OSError: the file cannot be created or written (the caller names the output).
        ValueError: a tensor named twice, or a dtype safetensors cannot store.
    """

    def __init__(self, path: Path, layout: Sequence[TensorSpec], metadata: Mapping[str, str] | None) -> None:
        self.path = path
        self.specs = {spec.key: spec for spec in layout}
        if len(self.specs) != len(layout):
            raise ValueError("the layout names a tensor twice")
        if bad := [s.key for s in layout if s.dtype not in CODES]:
            raise ValueError(f"{bad[0]!r}: a dtype safetensors cannot store")
        header, self._places = _header(layout, metadata)
        self._base = len(header)
        self.written: set[str] = set()
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            _pwrite(self._fd, header, 0)
            os.ftruncate(self._fd, self._base + sum(n for _, n in self._places.values()))
        except BaseException:
            self.abort()
            raise

    @property
    def closed(self) -> bool:
        return self._fd is None

    def check(self, key: str, shape: tuple[int, ...]) -> TensorSpec:
        """The layout's spec of `key`, checked writable with this shape.

        Raises:
            ValueError: a key not in the layout or already written, a closed file, or another shape.
        """
        spec = self.specs.get(key)
        if spec is None or key in self.written or self._fd is None:
            why = "is not in the layout" if spec is None else "was written already" if self._fd else "writer closed"
            raise ValueError(f"{key!r} {why}")
        if shape != spec.shape:
            raise ValueError(f"{key!r}: shape {shape}, the layout says {spec.shape}")
        return spec

    def write(self, key: str, tensor: torch.Tensor, *, finite: bool = True) -> None:
        """Store one tensor of the layout, converted to the layout's dtype.

        Raises:
            SpectraError: `finite` and the converted values are not all finite (fp16 overflow).
            ValueError: as `check`.
            OSError: the file cannot be written.
        """
        spec = self.check(key, tuple(tensor.shape))
        data = tensor.detach().to(device="cpu", dtype=spec.dtype).contiguous()
        if finite and data.is_floating_point() and not bool(torch.isfinite(data).all()):
            raise SpectraError(f"{printable(key)}: values are not finite in {spec.dtype} (NaN, or too large for it)")
        self.write_bytes(key, data.reshape(-1).view(torch.uint8).numpy().data)

    def write_bytes(self, key: str, data: bytes | memoryview, at: int = 0, last: bool = True) -> None:
        """Store raw bytes of tensor `key` (its stored encoding) at byte `at` of its data; `last` marks it written.

        Raises:
            ValueError: bytes beyond the tensor's data, or a key not writable.
            OSError: the file cannot be written.
        """
        spec = self.specs.get(key)
        offset, nbytes = self._places.get(key, (0, -1))
        if spec is None or key in self.written or self._fd is None or at + len(data) > nbytes:
            raise ValueError(f"{key!r}: {len(data)} bytes at {at} do not fit the layout, or it is not writable")
        _pwrite(self._fd, data, self._base + offset + at)
        if last:
            self.written.add(key)

    def close(self) -> None:
        """Sync and close the file once every tensor is written.

        Raises:
            ValueError: some tensor of the layout was never written.
            OSError: the file cannot be synced.
        """
        if missing := sorted(self.specs.keys() - self.written):
            raise ValueError(f"{len(missing)} tensors of the layout were never written, e.g. {missing[0]!r}")
        if self._fd is None:
            raise ValueError("the writer was closed")
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None

    def abort(self) -> None:
        """Close the file, finished or not."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _check_layout(config: Mapping[str, Any], specs: Mapping[str, TensorSpec]) -> None:
    """Every tensor of the layout is a LoRA factor of a module PEFT adapts under `config`, with the config's rank
    for that module (PEFT would silently leave out factors of a module it does not target)."""
    reader = ConfigReader.of(config)
    for key, spec in specs.items():
        match = LORA_KEY.match(key)
        if match is None or match["adapter"] or len(spec.shape) not in (1, 2) or min(spec.shape, default=1) < 1:
            raise ValueError(f"{key!r} {spec.shape}: not a LoRA tensor as PEFT saves it")
        if spec.dtype not in _CODES:
            raise ValueError(f"{key!r}: dtype {spec.dtype} is not one of {sorted(map(str, _CODES))}")
        module, part = match["module"], match["part"]
        if (resolved := reader.resolve(module)) is None:
            raise ValueError(f"{module!r}: the config does not adapt it; PEFT would ignore its factors")
        rank = spec.shape[0] if part.endswith("A") else spec.shape[-1]
        if match["param"] != "bias" and rank != resolved[0]:
            raise ValueError(f"{key!r} {spec.shape}: rank {rank}, but the config gives {module!r} r={resolved[0]}")


class AdapterWriter:
    """Writes one PEFT adapter folder: `write` each tensor of `layout` once, in any order, then `commit`.

    As a context manager it commits on a clean exit and removes everything on an exception (or KeyboardInterrupt);
    `abort` does the same by hand. Memory holds the tensor being written, never the adapter.

    Args:
        folder: the output folder; it must not exist, or be empty, unless `overwrite`.
        config: adapter_config.json's contents (from `build_adapter_config` or `resized_config`).
        layout: every tensor of adapter_model.safetensors (`lora_layout` builds one module's); each is checked to be
            a LoRA factor of a module the config targets, with the rank the config gives it.
        overwrite: replace an existing non-empty folder (atomically where the system supports it).
        metadata: extra safetensors metadata (strings); "format": "pt" is always set.

    Raises:
        OptionsError: the folder exists and is not empty, without `overwrite`.
        SpectraError: the folder cannot be created or written (a file is in the way, permissions, disk full).
        ValueError: a layout the config does not describe (a bug in the caller).
    """

    def __init__(
        self,
        folder: str | Path,
        config: Mapping[str, Any],
        layout: Sequence[TensorSpec],
        *,
        overwrite: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.folder = Path(os.path.realpath(folder))
        self.overwrite = overwrite
        self._specs = {spec.key: spec for spec in layout}
        if len(self._specs) != len(layout):
            raise ValueError("the layout names a tensor twice")
        _check_layout(config, self._specs)
        self._config = json.dumps(config, indent=2, allow_nan=False) + "\n"
        self._metadata = {"format": "pt", **(metadata or {})}
        self._check_target()
        self._tmp: Path | None = None
        self._file: TensorFile | None = None
        try:
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = Path(tempfile.mkdtemp(dir=self.folder.parent, prefix=f".{self.folder.name}.", suffix=".tmp"))
            os.chmod(self._tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
            self._file = TensorFile(self._tmp / ADAPTER_WEIGHTS, layout, self._metadata)
        except OSError as exc:
            self.abort()
            raise self._error(exc) from None
        except BaseException:
            self.abort()
            raise

    def _error(self, exc: OSError) -> SpectraError:
        return SpectraError(f"{self.folder}: cannot write the adapter ({exc.strerror or exc}); check the folder")

    def _check_target(self) -> None:
        if not os.path.lexists(self.folder):
            return
        if not self.folder.is_dir():
            raise SpectraError(f"{self.folder}: exists and is not a folder; choose another output folder")
        if not self.overwrite and any(self.folder.iterdir()):
            raise OptionsError(
                f"{self.folder}: exists and is not empty; choose another output folder or pass overwrite=True "
                "(CLI: --overwrite)"
            )

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Store one tensor of the layout at its place in the file now (converted to the layout's dtype).

        Raises:
            SpectraError: the values overflow the layout's dtype (fp16: |x| > 65504), or the file cannot be written.
            ValueError: a key not in the layout or already written, or a shape other than the layout's.
        """
        if self._file is None:
            raise ValueError(f"{key!r} writer closed")
        try:
            self._file.write(key, tensor)
        except OSError as exc:
            self.abort()
            raise self._error(exc) from None
        except SpectraError as exc:
            self.abort()
            raise SpectraError(f"{exc}; write the adapter in fp32 or bf16") from None

    def write_factors(
        self,
        module: str,
        b: torch.Tensor,
        a: torch.Tensor,
        *,
        transpose: bool = False,
        bias: torch.Tensor | None = None,
    ) -> None:
        """Store one module's factors given in the weight's orientation, ΔW = scale·b@a shaped as the stored weight,
        b (m, r), a (r, n); embeddings (found in the layout) and fan_in_fan_out layers (`transpose`) are stored
        transposed as PEFT expects. `bias` is stored as lora_B.bias: PEFT's merge adds scale·bias to the bias."""
        embedding = adapter_key(module, "lora_A", embedding=True) in self._specs
        stored_a, stored_b = (b.T, a.T) if transpose or embedding else (a, b)
        self.write(adapter_key(module, "lora_A", embedding), stored_a)
        self.write(adapter_key(module, "lora_B", embedding), stored_b)
        if bias is not None:
            self.write(adapter_key(module, "bias", embedding), bias)

    def commit(self) -> Path:
        """Finish the files and move the folder into place; returns it. Removes everything on failure.

        Raises:
            OptionsError: the output became a non-empty folder meanwhile, without `overwrite`.
            SpectraError: the files cannot be written or moved.
            ValueError: some tensor of the layout was never written.
        """
        try:
            if self._file is None or self._tmp is None:
                raise ValueError("the writer was closed")
            self._file.close()
            with open(self._tmp / ADAPTER_CONFIG, "w", encoding="utf-8") as fh:
                fh.write(self._config)
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_dir(self._tmp)
            self._check_target()
            self._publish(self._tmp)
            self._tmp = None
            _fsync_dir(self.folder.parent)
        except OSError as exc:
            self.abort()
            raise self._error(exc) from None
        except BaseException:
            self.abort()
            raise
        log.info("wrote %s (%d tensors)", self.folder, len(self._specs))
        return self.folder

    def _publish(self, tmp: Path) -> None:
        """Rename `tmp` to the output folder: over a missing or empty one, else swapped with the old one."""
        try:
            os.rename(tmp, self.folder)  # POSIX: replaces an empty folder; fails on a non-empty one
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not self.overwrite:
                raise
        if exchange(tmp, self.folder):  # tmp now holds the old output
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = Path(tempfile.mkdtemp(dir=self.folder.parent, prefix=f".{self.folder.name}.", suffix=".old"))
        os.rename(self.folder, old / "folder")
        try:
            os.rename(tmp, self.folder)
        except BaseException:
            os.rename(old / "folder", self.folder)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Remove the temporary folder and everything written; the output folder is left as it was."""
        if self._file is not None:
            self._file.abort()
            self._file = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> AdapterWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()


def _pwrite(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
