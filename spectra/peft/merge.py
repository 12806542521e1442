"""Merge a PEFT LoRA adapter into its base model and write the merged checkpoint, streaming and atomically.

Each adapted weight becomes W + scale·B@A (transposed for embeddings and fan_in_fan_out layers), computed in float32
(float64 for a float64 base) and stored in the base's dtype; lora_B biases are added to the module's bias, and
modules_to_save copies replace the base tensor, as PEFT's `merge_and_unload` does. Every other tensor is copied byte
for byte. The output mirrors the base: a `.safetensors` file gives a file; a model folder gives a folder with the same
shard names, the same index and the folder's other small files (config, tokenizer), so whatever loads the base
loads the merged model. Memory holds one tensor and its factors at a time: each file's header is written first and
each tensor goes to its offset (spectra.peft.write.TensorFile). Everything is staged by spectra.io.outputs.Outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spectra.errors import CheckpointError, MismatchError, OptionsError, SpectraError
from spectra.io.checkpoint import Checkpoint, _Folder, open_checkpoint
from spectra.io.header import DTYPES, TensorEntry, open_regular, quoted, read_metadata, read_small_file, shown
from spectra.io.outputs import Outputs
from spectra.names import ADAPTER_WEIGHTS, INDEX_NAME, natural_key
from spectra.peft.layout import PREFIX, saved_hits
from spectra.peft.read import LoraModule, LoraSettings, lora_modules, read_lora_settings
from spectra.peft.write import ADAPTER_DTYPES, TensorFile, TensorSpec

log = logging.getLogger(__name__)

# the engine's ProgressHook (spectra.engine.executor), restated: peft comes before engine in the layer order
ProgressHook = Callable[[Iterable[Any]], Iterable[Any]]
# files of a model folder that are weights in other formats: never copied (they would not hold the merged weights)
WEIGHT_SUFFIXES = (
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".pkl",
    ".pickle",
    ".gguf",
    ".safetensors",
    ".h5",
    ".msgpack",
    ".onnx",
)
MAX_SMALL_FILE = 256 * 2**20  # a tokenizer.json is tens of MB; anything larger is not a small file
COPY_BYTES = 64 * 2**20  # bytes of an unchanged tensor copied at a time


def identity(items: Iterable[Any]) -> Iterable[Any]:
    """The progress hook that shows nothing."""
    return items


@dataclass(frozen=True, slots=True)
class MergeResult:
    """What `merge_adapter` wrote."""

    path: Path  # the .safetensors file, or the model folder, written
    merged: tuple[str, ...]  # base tensor keys that received scale·B·A (and lora bias), natural order
    copied: int  # base tensors written unchanged
    elapsed_s: float

    def __post_init__(self) -> None:
        if self.copied < 0 or self.elapsed_s < 0:
            raise ValueError("copied and elapsed_s must be ≥ 0")


@dataclass(frozen=True, slots=True)
class _Update:
    """What happens to one base tensor: + scale·B@A (module), + scale·lora_B.bias (bias_of), or replaced by the
    adapter's copy (saved), onto which B@A is added when the module also has LoRA factors."""

    module: LoraModule | None = None
    transpose: bool = False
    bias_of: TensorEntry | None = None  # lora_B.bias, added to the module's bias
    scale: float = 1.0
    saved: TensorEntry | None = None  # a modules_to_save copy, or the base layer's (save_embedding_layers)

    @property
    def merged(self) -> bool:
        return self.module is not None or self.bias_of is not None


def merge_adapter(
    base: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    dtype: str | None = None,
    download: bool = False,
    progress: ProgressHook = identity,
) -> MergeResult:
    """Write BASE with the LoRA adapter merged in (W + scale·B@A per adapted weight); returns what was written.

    Args:
        base: the base model: a `.safetensors` file, a model folder (sharded or not) or a cached hub id.
        adapter: a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).
        out: a `.safetensors` file when BASE is a file, else a model folder.
        overwrite: replace an existing OUT.
        dtype: "fp32", "bf16" or "fp16" for every floating tensor of the output; None keeps each tensor's dtype.
        download: let huggingface_hub download a hub id BASE that is not cached.
        progress: wraps the stream of base tensor names as they are written.

    Raises:
        OptionsError: a bad dtype; OUT is an input, inside or around one, or exists without `overwrite`.
        CheckpointError: BASE or ADAPTER unreadable, not a plain LoRA adapter (DoRA and other variants, trainable
            tokens, several adapters), a base that is itself an adapter.
        MismatchError: an adapter module, bias or modules_to_save tensor that matches no base tensor, or whose shape
            differs from it.
        SpectraError: OUT cannot be written (nothing is written then).
    """
    started = time.perf_counter()
    if dtype is not None and dtype not in ADAPTER_DTYPES:
        raise OptionsError(f"dtype must be one of {', '.join(ADAPTER_DTYPES)} or None, got {dtype!r}")
    out_dtype = None if dtype is None else ADAPTER_DTYPES[dtype]
    with contextlib.ExitStack() as stack:
        base_ck = stack.enter_context(open_checkpoint(os.fspath(base), download=download))
        if base_ck.format == "peft-adapter":
            raise CheckpointError(
                f"{shown(base_ck.path)}: BASE is a PEFT adapter; pass the base model it was trained on"
            )
        lora = stack.enter_context(open_checkpoint(os.fspath(adapter)))
        if lora.format != "peft-adapter":
            raise CheckpointError(
                f"{shown(lora.path)}: not a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)"
            )
        if not base_ck.entries:
            raise CheckpointError(f"{shown(base_ck.path)}: holds no tensors; pass the base model's weights")
        updates = _updates(base_ck, lora, _settings(lora))
        single = base_ck.format == "safetensors"
        outputs = Outputs(inputs=[base_ck.location, lora.location])
        target = _plan(outputs, out, [base_ck.location, lora.location], single, overwrite)
        with outputs:
            staged = outputs.stage(target)
            try:
                _write_all(base_ck, lora, updates, staged, single, out_dtype, progress)
            except OSError as exc:
                raise SpectraError(
                    f"{shown(os.fspath(out))}: cannot write the merged model ({exc.strerror or exc}); nothing was "
                    "written"
                ) from None
    merged = tuple(n for n in sorted(updates, key=natural_key) if updates[n].merged)
    return MergeResult(target, merged, len(base_ck.entries) - len(updates), time.perf_counter() - started)


def _write_all(
    base: Checkpoint,
    lora: Checkpoint,
    updates: dict[str, _Update],
    staged: Path,
    single: bool,
    dtype: torch.dtype | None,
    progress: ProgressHook,
) -> None:
    """Write every output file into `staged`: one safetensors file open at a time, its tensors in natural order.

    Raises:
        OSError: a file cannot be written (the caller names the output).
    """
    files = _layouts(base, dtype)
    if not single:
        staged.mkdir()
        _copy_small_files(base, staged, {file.name for file in files}, dtype)
    order = {file: i for i, file in enumerate(sorted(files, key=lambda f: natural_key(f.name)))}
    names = sorted(base.entries, key=lambda n: (order[base.entries[n].file], natural_key(n)))
    writer: TensorFile | None = None
    current: Path | None = None  # the base file `writer` mirrors
    try:
        for name in progress(names):
            entry = base.entries[name]
            if writer is None or current != entry.file:
                if writer is not None:
                    writer.close()
                path = staged if single else staged / entry.file.name
                writer, current = TensorFile(path, files[entry.file], read_metadata(entry.file)), entry.file
            _write(base, lora, entry, writer, updates.get(name))
        if writer is not None:
            writer.close()
    finally:
        if writer is not None:
            writer.abort()


def _settings(lora: Checkpoint) -> LoraSettings:
    """The adapter's settings; DoRA and the other LoRA variants are refused (their merge is not W + scale·B@A)."""
    settings = read_lora_settings(lora.location, lora.path)
    if settings.dora:
        raise CheckpointError(
            f"{shown(lora.path)}: a DoRA adapter (use_dora): its merge rescales W by its magnitude vector; spectra "
            "merges plain LoRA adapters, use PEFT's merge_and_unload for DoRA"
        )
    if settings.variant is not None:
        raise CheckpointError(
            f"{shown(lora.path)}: a {settings.variant} adapter: its ΔW is not scale·B·A; spectra merges plain LoRA "
            "adapters"
        )
    return settings


def _plan(outputs: Outputs, out: str | os.PathLike[str], inputs: list[Path], single: bool, overwrite: bool) -> Path:
    """Plan OUT (a file or a folder), refusing an input, a place inside or around one, or an existing OUT."""
    real = Path(os.path.realpath(out))
    for where in map(lambda p: Path(os.path.realpath(p)), inputs):
        if real == where or (where.is_dir() and real.is_relative_to(where)) or where.is_relative_to(real):
            raise OptionsError(
                f"{shown(os.fspath(out))}: is {shown(where)}, inside it or holds it; write the merged model apart "
                "from the inputs"
            )
    if not single:
        return outputs.folder(out, "OUT", overwrite=overwrite)
    if os.path.lexists(real) and not overwrite:
        raise OptionsError(f"{shown(os.fspath(out))}: exists; choose another path or pass overwrite=True")
    return outputs.file(out, "OUT")


def _updates(base: Checkpoint, lora: Checkpoint, settings: LoraSettings) -> dict[str, _Update]:
    """base key -> its update, every adapter tensor matched to a base tensor of the right shape.

    Raises:
        CheckpointError: adapter tensors that are neither LoRA factors, lora biases nor modules_to_save copies.
        MismatchError: a module, bias or saved tensor with no base tensor, or of another shape.
    """
    modules, others = lora_modules(lora.entries, settings, lora.path)
    weights = lora.location / ADAPTER_WEIGHTS
    keys = set(base.entries)
    prefix = _prefix(keys, [f"{m}.weight" for m in modules])

    def base_key(key: str, what: str) -> str:
        added, removed = prefix
        if key in keys:
            return key
        if key.startswith(removed) and (candidate := added + key[len(removed) :]) in keys:
            return candidate
        raise MismatchError(
            f"{shown(weights)}: {what} {quoted(key)} matches no tensor of {shown(base.path)}; is this the adapter's "
            "base model?"
        )

    updates: dict[str, _Update] = {}
    for module, found in modules.items():
        if not isinstance(found, LoraModule):
            error = MismatchError if found.reason == "shape-mismatch" else CheckpointError
            raise error(f"{shown(weights)}: module {quoted(module)}: {found.detail or found.reason}; cannot merge it")
        name = base_key(f"{module}.weight", "module")
        shape, transpose = found.shape, found.transpose
        stored = base.entries[name].shape
        if stored != shape and stored == shape[::-1]:  # PEFT sets fan_in_fan_out per layer type (Conv1D)
            transpose = not transpose
        elif stored != shape:
            raise MismatchError(
                f"{shown(weights)}: module {quoted(module)}: ΔW {shape} but base {quoted(name)} is {stored}; "
                "is this the adapter's base model?"
            )
        updates[name] = _Update(found, transpose, scale=found.scale)
    for skipped in others:
        key = skipped.name.removeprefix(PREFIX)
        if skipped.reason == "not-2d" and skipped.detail.startswith("LoRA bias"):
            module = key.rsplit(".lora_B", 1)[0]
            name = base_key(f"{module}.bias", "lora_B.bias of module")
            entry = lora.entries[skipped.name]
            _same_shape(weights, skipped.name, entry.shape, name, base.entries[name].shape)
            updates[name] = _Update(bias_of=entry, scale=settings.scale(module))
        elif "modules_to_save" in skipped.detail:
            name = base_key(_saved_name(key, settings), "modules_to_save tensor")
            entry = lora.entries[skipped.name]
            _same_shape(weights, skipped.name, entry.shape, name, base.entries[name].shape)
            if name in updates:
                raise CheckpointError(f"{shown(weights)}: {quoted(name)} is both a LoRA module and modules_to_save")
            updates[name] = _Update(saved=entry)
        elif ".base_layer." in key:  # PEFT loads this copy of the layer's weight (save_embedding_layers), then merges
            name = base_key(key.replace(".base_layer.", "."), "base layer copy")
            entry = lora.entries[skipped.name]
            _same_shape(weights, skipped.name, entry.shape, name, base.entries[name].shape)
            updates[name] = dataclasses.replace(updates.get(name, _Update()), saved=entry)
        else:
            raise CheckpointError(
                f"{shown(weights)}: {quoted(skipped.name)}: {skipped.detail or skipped.reason}; spectra merges LoRA "
                "factors, lora biases, modules_to_save and base layer copies only"
            )
    return updates


def _saved_name(key: str, settings: LoraSettings) -> str:
    """The base key of a modules_to_save copy ("score.modules_to_save.weight" or "score.weight" -> "score.weight")."""
    parts = [p for p in key.split(".") if p != "modules_to_save"]
    module = ".".join(parts[:-1])
    if parts[-2:-1] == ["default"] and not saved_hits(settings.modules_to_save, module):
        parts.pop(-2)  # an adapter name PEFT left in the key
    return ".".join(parts)


def _same_shape(weights: Path, key: str, shape: tuple[int, ...], name: str, stored: tuple[int, ...]) -> None:
    if shape != stored:
        raise MismatchError(f"{shown(weights)}: {quoted(key)} is {shape} but base {quoted(name)} is {stored}")


def _prefix(keys: set[str], wanted: list[str]) -> tuple[str, str]:
    """(added, removed): adapter names become base keys as added + name.removeprefix(removed); ("", "") when every
    name is a base key, else the one dotted prefix (on either side) that makes most of them base keys."""
    missing = [w for w in wanted if w not in keys]
    if not missing:
        return "", ""
    votes: dict[tuple[str, str], int] = {}
    for name in missing:
        for i, char in enumerate(name):  # the adapter's names carry a prefix the base lacks
            if char == "." and name[i + 1 :] in keys:
                votes[("", name[: i + 1])] = votes.get(("", name[: i + 1]), 0) + 1
    tails = {k[k.index(".") + 1 :]: k[: k.index(".") + 1] for k in keys if "." in k}
    for name in missing:  # the base's keys carry one component the adapter's lack ("model.")
        if name in tails:
            votes[(tails[name], "")] = votes.get((tails[name], ""), 0) + 1
    if not votes:
        return "", ""
    best = max(votes.items(), key=lambda item: item[1])[0]
    log.info("adapter module names normalised: prefix %r added, %r removed", *best)
    return best


def _layouts(base: Checkpoint, dtype: torch.dtype | None) -> dict[Path, list[TensorSpec]]:
    """file -> the tensors it holds, each with its output dtype (the base's, or `dtype` for floating tensors)."""
    files: dict[Path, list[TensorSpec]] = {}
    for name, entry in base.entries.items():
        stored = DTYPES[entry.code][0]
        files.setdefault(entry.file, []).append(
            TensorSpec(name, entry.shape, dtype if dtype is not None and entry.is_float else stored)
        )
    return files


def _write(base: Checkpoint, lora: Checkpoint, entry: TensorEntry, file: TensorFile, update: _Update | None) -> None:
    """Write one base tensor: merged, replaced, converted to the output dtype, or its bytes copied unchanged."""
    spec = file.specs[entry.name]
    if update is None and spec.dtype == DTYPES[entry.code][0]:
        _copy(entry, file)
        return
    if update is None:
        file.write(entry.name, base.read(entry.name), finite=False)
        return
    if update.saved is not None and not update.merged:
        file.write(entry.name, lora.read(update.saved.name), finite=False)
        return
    weight = base.read(entry.name) if update.saved is None else lora.read(update.saved.name)
    work = torch.float64 if DTYPES[entry.code][0] == torch.float64 else torch.float32
    merged = weight.to(work)
    if update.module is not None:
        b = lora.read(update.module.b.name).to(work)
        a = lora.read(update.module.a.name).to(work)
        delta = (b @ a).mul_(update.scale)
        merged += delta.T if update.transpose else delta
    if update.bias_of is not None:
        merged += lora.read(update.bias_of.name).to(work) * update.scale
    file.write(entry.name, merged, finite=bool(torch.isfinite(weight).all()))


def _copy(entry: TensorEntry, file: TensorFile) -> None:
    """Copy a tensor's stored bytes, a block at a time."""
    fd, _ = open_regular(entry.file)
    try:
        done = 0
        while True:
            block = os.pread(fd, min(COPY_BYTES, entry.nbytes - done), entry.start + done)
            if not block and done < entry.nbytes:
                raise CheckpointError(f"{shown(entry.file)}: tensor {quoted(entry.name)} is cut short (truncated?)")
            done += len(block)
            file.write_bytes(entry.name, block, done - len(block), last=done == entry.nbytes)
            if done == entry.nbytes:
                return
    finally:
        os.close(fd)


def _copy_small_files(base: Checkpoint, staged: Path, shards: set[str], dtype: torch.dtype | None) -> None:
    """Copy the base folder's other files (config, tokenizer, index): regular files inside it, no weights of other
    formats, no hidden files, no sub-folders. The index is copied verbatim, its total_size updated when `dtype`
    changes sizes."""
    folder = _Folder(base.location)
    for name in folder.names():
        if name in shards or name.lower().endswith(WEIGHT_SUFFIXES) or name.startswith("."):
            continue
        try:
            path = folder.member(name)
        except CheckpointError as exc:  # a link out of the folder, a FIFO, a sub-folder: not part of the model
            log.info("not copied: %s", exc)
            continue
        if path is None or os.stat(path).st_size > MAX_SMALL_FILE:
            continue
        if name == INDEX_NAME and dtype is not None:
            index = json.loads(read_small_file(path, MAX_SMALL_FILE, "shard index"))
            total = sum(_nbytes(e, dtype) for e in base.entries.values())
            index.setdefault("metadata", {})["total_size"] = total
            (staged / name).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(path, staged / name)


def _nbytes(entry: TensorEntry, dtype: torch.dtype) -> int:
    return entry.nbytes // DTYPES[entry.code][0].itemsize * dtype.itemsize if entry.is_float else entry.nbytes
