"""load: layouts, lazy index, dtypes, and one clear CheckpointError per kind of bad file."""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path

import pytest
import torch

from conftest import LAYOUTS, save_checkpoint
from spectra import CheckpointError
from spectra.io.checkpoint import open_checkpoint
from spectra.io.header import read_header

TENSORS = {
    "a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "b.bias": torch.ones(3),
    "c.weight": torch.full((2, 5), 0.5),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_lists_and_reads_tensors(tmp_path: Path, layout: str) -> None:
    path = save_checkpoint(TENSORS, tmp_path, layout)
    with open_checkpoint(str(path)) as ck:
        assert set(ck.entries) == set(TENSORS)
        assert ck.entries["a.weight"].shape == (3, 4)
        assert ck.info.n_tensors == 3 and ck.info.dtypes == ("f32",)
        assert ck.info.format == {"file": "safetensors", "folder": "folder", "shards": "sharded"}[layout]
        for name, t in TENSORS.items():
            assert torch.equal(ck.read(name), t)


@pytest.mark.parametrize(("dtype", "short"), [(torch.float32, "f32"), (torch.float16, "f16"), (torch.bfloat16, "bf16")])
def test_storage_dtypes_are_read_bit_exactly(tmp_path: Path, dtype: torch.dtype, short: str) -> None:
    t = torch.randn(7, 9).to(dtype)
    path = save_checkpoint({"w": t}, tmp_path)
    with open_checkpoint(str(path)) as ck:
        assert ck.entries["w"].dtype_name == short
        got = ck.read("w")
        assert got.dtype == dtype and torch.equal(got.view(torch.uint8), t.view(torch.uint8))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_row_ranges_read_into_a_reused_buffer(tmp_path: Path, layout: str) -> None:
    t = torch.randn(11, 6).to(torch.bfloat16)
    path = save_checkpoint({"x": torch.ones(2), "w": t}, tmp_path, layout)
    with open_checkpoint(str(path)) as ck:
        buffer = torch.empty(4 * 6, dtype=torch.bfloat16)
        for lo in range(0, 11, 4):
            hi = min(11, lo + 4)
            got = ck.read("w", (lo, hi), buffer[: (hi - lo) * 6])
            assert got.shape == (hi - lo, 6) and got.data_ptr() == buffer.data_ptr()
            assert torch.equal(got.view(torch.int16), t[lo:hi].view(torch.int16))
        assert torch.equal(ck.read("w", (9, 11)), t[9:])


def test_index_is_read_without_tensor_data(tmp_path: Path) -> None:
    path = save_checkpoint({"w": torch.randn(64, 64)}, tmp_path)
    with open_checkpoint(str(path)) as ck:
        assert ck.entries["w"].nbytes == 64 * 64 * 4
        assert len(ck.handles) == 0  # no tensor file opened until read()


def expect_error(path: Path, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(str(path))
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    rest = message.replace(str(path), "")  # fragments must not match the test's own folder name
    for fragment in fragments:
        assert fragment in rest, message
    return message


def test_missing_path(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope.safetensors", "no such file")


def test_not_safetensors(tmp_path: Path) -> None:
    (tmp_path / "x.safetensors").write_text("hello, this is not a checkpoint at all")
    expect_error(tmp_path / "x.safetensors", "not a safetensors file")


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": "44", "data_offsets": [0, 64]},  # a string is not a shape
        {"dtype": "F32", "shape": [4.0, 4], "data_offsets": [0, 64]},
        {"dtype": "F32", "shape": [True, 16], "data_offsets": [0, 64]},
        {"dtype": "F32", "shape": [4, -4], "data_offsets": [0, 64]},
        {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32, 64]},
        {"dtype": 7, "shape": [4, 4], "data_offsets": [0, 64]},
        {"shape": [4, 4], "data_offsets": [0, 64]},
    ],
)
def test_malformed_header_entries_are_refused_not_guessed(tmp_path: Path, entry: dict[str, object]) -> None:
    header = json.dumps({"w": entry}).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    expect_error(path, "'w'", "malformed header")


def test_truncated_file_names_the_tensor(tmp_path: Path) -> None:
    path = save_checkpoint({"w": torch.randn(32, 32)}, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    expect_error(path, "truncated", "'w'")


def test_pickle_is_refused_never_unpickled(tmp_path: Path) -> None:
    bomb = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2)}, bomb)  # a zip-pickle; opening it must not unpickle
    expect_error(bomb, "pickle", "safetensors")
    renamed = tmp_path / "sneaky.safetensors"
    renamed.write_bytes(bomb.read_bytes())
    expect_error(renamed, "pickle")


def test_folder_with_only_pickle_weights(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    expect_error(tmp_path, "pickle", "pytorch_model.bin")


def test_missing_shard(tmp_path: Path) -> None:
    path = save_checkpoint(TENSORS, tmp_path, "shards")
    (path / "model-00002-of-00002.safetensors").unlink()
    expect_error(path, "shard 'model-00002-of-00002.safetensors'", "is missing", "model.safetensors.index.json")
    expect_error(path / "model.safetensors.index.json", "shard 'model-00002-of-00002.safetensors'", "is missing")


def test_the_index_file_opens_its_sharded_folder(tmp_path: Path) -> None:
    path = save_checkpoint(TENSORS, tmp_path, "shards")
    with open_checkpoint(str(path / "model.safetensors.index.json")) as ck:
        assert ck.format == "sharded" and ck.location == path and set(ck.entries) == set(TENSORS)
        assert torch.equal(ck.read("c.weight"), TENSORS["c.weight"])


def test_a_large_header_parses_quickly(tmp_path: Path) -> None:
    """The hot path: a 7B-like header (~500 tensors) parses in milliseconds (measured ~3 ms; bound loose for CI)."""
    meta: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for i in range(500):
        shape = [4096, 4096] if i % 2 else [4096]
        nbytes = 2 * math.prod(shape)
        meta[f"model.layers.{i // 9}.mlp.proj{i}.weight"] = {
            "dtype": "BF16",
            "shape": shape,
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(meta).encode()
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text)
        fh.truncate(8 + len(text) + offset)  # sparse: 8 GiB of zeros that take no disk
    read_header(path)
    started = time.perf_counter()
    for _ in range(10):
        entries = read_header(path)
    assert len(entries) == 500 and (time.perf_counter() - started) / 10 < 0.05


def test_empty_folder(tmp_path: Path) -> None:
    expect_error(tmp_path, "no model.safetensors")
