"""Hostile and broken inputs to the loader (issue 18): each either opens correctly or raises one CheckpointError line
naming the file (and the tensor or index entry); never another exception, a hang, a read outside the folder the user
named, or a changed input. Every bug fixed in the loader keeps its reproducer here."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from conftest import save_checkpoint
from spectra import CheckpointError, Options, analyze
from spectra.io.checkpoint import open_checkpoint
from spectra.io.header import read_header

INDEX = "model.safetensors.index.json"
ENTRY = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


# ---------------------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    """Every test here must finish within 5 s: a blocking open of a FIFO fails the test instead of hanging it."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError("the loader hung")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, 5.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def raw(path: Path, header: object | str | bytes, data: int | bytes = 0) -> Path:
    """A file with the 8-byte length, `header` (JSON-encoded unless str/bytes) and `data` (bytes, or a zero count)."""
    text = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header))
    blob = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    payload = data if isinstance(data, bytes) else bytes(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + payload)
    return path


def refused(path: Path | str, *fragments: str, opener: Callable[[], object] | None = None) -> str:
    """The one-line CheckpointError that opening `path` raises; it names `path` and holds `fragments`."""
    with pytest.raises(CheckpointError) as info:
        opener() if opener is not None else open_checkpoint(str(path))
    message = str(info.value)
    assert len(message.splitlines()) == 1 and "\x1b" not in message, message
    message.encode("utf-8")  # no lone surrogate reaches the terminal
    assert str(path) in message, message
    for fragment in fragments:  # not found in the test's own folder name
        assert scrub(fragment) in scrub(message), message
    return message


def scrub(text: str) -> str:
    """`text` with pytest's per-test folder (named after the test) replaced by <tmp>."""
    return re.sub(r"[^\s']*/pytest-\d+/[^/\s']+", "<tmp>", text)


def digest(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def sharded(where: Path, weight_map: dict[str, object] | None = None, **extra: object) -> Path:
    """Two real shards (a.weight, b.weight) and an index that may be overridden."""
    save_checkpoint({"a.weight": torch.ones(2, 2), "b.weight": torch.zeros(3, 2)}, where, "shards")
    if weight_map is not None or extra:
        doc: dict[str, object] = {"metadata": {}, "weight_map": weight_map}
        doc.update(extra)
        (where / INDEX).write_text(json.dumps(doc))
    return where


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path os.open is asked for, from here on."""
    seen: list[str] = []
    real_open = os.open

    def spy(path: Any, *args: Any, **kw: Any) -> int:
        seen.append(os.path.realpath(path))
        return real_open(path, *args, **kw)

    monkeypatch.setattr(os, "open", spy)
    return seen


# ---------------------------------------------------------------------------------------------------- 1. outside


@pytest.mark.parametrize(
    "shard",
    [
        "../outside/secret.safetensors",
        "sub/../../outside/secret.safetensors",
        "OUTSIDE_ABSOLUTE",
        "../../../../../../../../etc/passwd",
        "/etc/passwd",
    ],
)
def test_index_cannot_name_a_shard_outside_its_folder(tmp_path: Path, shard: str, opened: list[str]) -> None:
    secret = save_checkpoint({"secret.weight": torch.ones(4, 4)}, tmp_path / "outside", "file")
    secret.rename(tmp_path / "outside" / "secret.safetensors")
    shard = shard.replace("OUTSIDE_ABSOLUTE", str(tmp_path / "outside" / "secret.safetensors"))
    model = sharded(tmp_path / "model", {"a.weight": "model-00001-of-00002.safetensors", "secret.weight": shard})
    message = refused(model / INDEX, "'secret.weight'", "a shard must be a file in the folder")
    assert ("absolute path" if shard.startswith("/") else "outside the folder") in message
    assert not any(not p.startswith(str(model.resolve())) for p in opened), opened


def test_a_shard_symlink_leading_outside_is_refused(tmp_path: Path, opened: list[str]) -> None:
    secret = tmp_path / "outside" / "secret.safetensors"
    save_file({"secret.weight": torch.ones(4, 4)}, str(raw(secret, {}, 0)))
    model = sharded(tmp_path / "model", {"a.weight": "model-00001-of-00002.safetensors", "secret.weight": "s.st"})
    (model / "s.st").symlink_to(secret)
    refused(model / INDEX, "'secret.weight'", "'s.st'", "outside", str(secret))
    (model / "s.st").unlink()
    (model / "sub").symlink_to(tmp_path / "outside", target_is_directory=True)  # a linked folder is no way out
    (model / INDEX).write_text(json.dumps({"weight_map": {"secret.weight": "sub/secret.safetensors"}}))
    refused(model / INDEX, "'secret.weight'", "outside")
    assert str(secret) not in opened


def test_links_inside_the_folder_and_into_a_hub_snapshots_blobs_are_followed(tmp_path: Path) -> None:
    model = sharded(tmp_path / "model")
    (model / "real").mkdir()
    (model / "model-00001-of-00002.safetensors").rename(model / "real" / "one.safetensors")
    (model / "model-00001-of-00002.safetensors").symlink_to(Path("real") / "one.safetensors")
    with open_checkpoint(str(model)) as ck:
        assert torch.equal(ck.read("a.weight"), torch.ones(2, 2))
    snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / ("c" * 40)
    blob = tmp_path / "hub" / "models--org--name" / "blobs" / "0123abcd"
    save_file({"w": torch.ones(3, 3)}, str(raw(blob, {}, 0)))
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(Path("../../blobs/0123abcd"))
    with open_checkpoint(str(snapshot)) as ck:
        assert ck.format == "folder" and torch.equal(ck.read("w"), torch.ones(3, 3))


def test_a_folders_own_file_linked_outside_is_refused_but_a_named_link_is_followed(tmp_path: Path) -> None:
    elsewhere = save_checkpoint({"w": torch.ones(2, 2)}, tmp_path / "elsewhere", "file")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").symlink_to(elsewhere)
    refused(tmp_path / "model", "resolves to", "outside", "pass the file itself")
    with open_checkpoint(str(tmp_path / "model" / "model.safetensors")) as ck:  # the user named this file
        assert list(ck.entries) == ["w"]


@pytest.mark.parametrize(
    ("weight_map", "fragments"),
    [
        ({"a.weight": 1}, ("'a.weight'", "is a int, not a shard file name")),
        ({"a.weight": None}, ("'a.weight'", "null")),
        ({"a.weight": ["model-00001-of-00002.safetensors"]}, ("'a.weight'", "list")),
        ({"a.weight": {"x": 1}}, ("'a.weight'", "dict")),
        ({}, ("lists no tensors",)),
        ({"a.weight": ""}, ("'a.weight'", "not a file name")),
        ({"a.weight": "."}, ("not a file name",)),
        ({"a.weight": "sub/"}, ("not a file name",)),
        ({"a.weight": "a\x00b.safetensors"}, ("NUL",)),
        ({"a.weight": "pytorch_model-00001.bin"}, ("pickle", "never unpickles")),
        ({"a.weight": "missing.safetensors"}, ("'missing.safetensors'", "missing")),
    ],
)
def test_malformed_weight_maps(tmp_path: Path, weight_map: dict[str, object], fragments: tuple[str, ...]) -> None:
    model = sharded(tmp_path / "model", weight_map)
    refused(model / INDEX, *fragments)


@pytest.mark.parametrize(
    "document",
    ['["weight_map"]', '{"weight_map": ["a"]}', '{"metadata": {}}', "not json", '"weight_map"', "", "\ufeff{}"],
)
def test_an_index_that_is_not_an_index(tmp_path: Path, document: str) -> None:
    model = sharded(tmp_path / "model")
    (model / INDEX).write_text(document)
    refused(model / INDEX, "shard index")


# ---------------------------------------------------------------------------------------------------- 2. hangs


@pytest.mark.parametrize("where", ["shard", "model.safetensors", "direct", "index", "adapter_config.json"])
def test_a_fifo_never_blocks(tmp_path: Path, where: str) -> None:
    if where == "shard":
        model = sharded(tmp_path / "model")
        (model / "model-00002-of-00002.safetensors").unlink()
        os.mkfifo(model / "model-00002-of-00002.safetensors")
        refused(model / INDEX, "'b.weight'", "FIFO", opener=lambda: open_checkpoint(str(model)))
    elif where == "model.safetensors":
        (tmp_path / "model").mkdir()
        os.mkfifo(tmp_path / "model" / "model.safetensors")
        refused(
            tmp_path / "model" / "model.safetensors", "FIFO", opener=lambda: open_checkpoint(str(tmp_path / "model"))
        )
    elif where == "direct":
        os.mkfifo(tmp_path / "pipe.safetensors")
        refused(tmp_path / "pipe.safetensors", "FIFO", "not a checkpoint file or folder")
        with pytest.raises(CheckpointError, match="FIFO"):
            read_header(tmp_path / "pipe.safetensors")
    elif where == "index":
        model = sharded(tmp_path / "model")
        (model / INDEX).unlink()
        os.mkfifo(model / INDEX)
        refused(model / INDEX, "FIFO", opener=lambda: open_checkpoint(str(model)))
    else:
        save_file({"w": torch.ones(2, 2)}, str(tmp_path / "adapter_model.safetensors"))
        os.mkfifo(tmp_path / "adapter_config.json")
        refused(tmp_path / "adapter_config.json", "FIFO", opener=lambda: open_checkpoint(str(tmp_path)))


def test_devices_sockets_and_folders_are_not_files(tmp_path: Path) -> None:
    refused("/dev/zero", "character device")
    with pytest.raises(CheckpointError, match="character device"):
        read_header(Path("/dev/null"))
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(tmp_path / "s.safetensors"))
        refused(tmp_path / "s.safetensors", "socket")
    finally:
        server.close()
    model = sharded(tmp_path / "model", {"a.weight": "sub"})
    (model / "sub").mkdir()
    refused(model / INDEX, "'a.weight'", "'sub'", "is a folder, not a regular file")


@pytest.mark.parametrize(
    ("shape", "offsets", "fragment"),
    [
        ([2**62, 2**62], [0, 0], "more than 2^63"),
        ([2**31] * 3, [0, 16], "more than 2^63"),
        ([2**63], [0, 0], "more than 2^63"),
        ([0, 2**63], [0, 0], "more than 2^63"),  # torch cannot describe it even empty: its strides overflow
        ([10**18], [0, 16], "does not match its shape"),
        ([4, 4], [0, 10**19], "does not match its shape"),
        ([4] * 100_000, [0, 16], "more than 2^63"),
        ([1] * 200_000 + [5], [0, 16], "does not match its shape"),
    ],
)
def test_huge_shapes_fail_fast(tmp_path: Path, shape: list[int], offsets: list[int], fragment: str) -> None:
    path = raw(tmp_path / "m.safetensors", {"w": {"dtype": "F32", "shape": shape, "data_offsets": offsets}}, 16)
    message = refused(path, "'w'", fragment)
    assert len(message) < 400


def test_a_size_that_passes_the_shape_check_still_cannot_outrun_the_file(tmp_path: Path) -> None:
    path = raw(tmp_path / "m.safetensors", {"w": {"dtype": "U8", "shape": [2**40], "data_offsets": [0, 2**40]}}, 8)
    refused(path, "'w'", "truncated")


# ---------------------------------------------------------------------------------------------------- 3. one line


@pytest.mark.parametrize("depth", [200, 100_000])
def test_deeply_nested_headers_and_indexes(tmp_path: Path, depth: int) -> None:
    nested = '{"w": {"dtype": "F32", "shape": ' + "[" * depth + "]" * depth + ', "data_offsets": [0, 0]}}'
    path = raw(tmp_path / "m.safetensors", nested)
    refused(path, "'w'" if depth < 900 else "nested too deeply")
    model = sharded(tmp_path / "model")
    (model / INDEX).write_text('{"weight_map": ' + '{"a": ' * depth + "1" + "}" * depth + "}")
    refused(model / INDEX, "weight_map" if depth < 900 else "shard index is nested too deeply")


@pytest.mark.parametrize(
    "shape", [[[2], [2]], ["2", "2"], [None, 2], [2.0, 2], [2, 1e300], [2, -2], [-0.0, 2], {"0": 2}, 4]
)
def test_shapes_that_are_not_lists_of_sizes(tmp_path: Path, shape: object) -> None:
    path = raw(tmp_path / "m.safetensors", {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 16]}}, 16)
    refused(path, "'w'", "malformed header entry")


def test_a_scalar_loads_and_is_skipped_as_not_2d(tmp_path: Path) -> None:
    w = torch.randn(6, 5)
    base = save_checkpoint({"scale": torch.tensor(2.0), "w": w}, tmp_path / "base")
    tuned = save_checkpoint({"scale": torch.tensor(3.0), "w": w + torch.randn(6, 5)}, tmp_path / "tuned")
    with open_checkpoint(str(tuned)) as ck:
        assert ck.entries["scale"].shape == () and ck.read("scale").item() == 3.0
    analysis = analyze(str(base), str(tuned), Options(precision="exact"))
    assert [m.name for m in analysis.layers] == ["w"]
    assert [(s.name, s.reason) for s in analysis.skipped] == [("scale", "not-2d")]


def test_permission_denied_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run as root, where chmod 000 changes nothing: the denials are simulated."""
    model = sharded(tmp_path / "model")
    shard = model / "model-00002-of-00002.safetensors"
    real_open, real_stat, real_scandir = os.open, os.stat, os.scandir

    def deny(path: Any, *args: Any, **kw: Any) -> Any:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "open", lambda p, *a, **k: deny(p) if Path(p) == shard else real_open(p, *a, **k))
    refused(
        shard, "cannot open it (Permission denied)", "check its permissions", opener=lambda: open_checkpoint(str(model))
    )
    monkeypatch.setattr(os, "open", real_open)
    # a folder without search permission: nothing in it can be examined
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: deny(p) if Path(p).parent == model else real_stat(p, *a, **k))
    refused(model / INDEX, "cannot access it (Permission denied)", opener=lambda: open_checkpoint(str(model)))
    monkeypatch.setattr(os, "stat", real_stat)
    # a folder that cannot be listed (no index, no model.safetensors: spectra looks for *.safetensors)
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(os, "scandir", lambda p=".": deny(p) if Path(p) == tmp_path / "empty" else real_scandir(p))
    refused(tmp_path / "empty", "cannot list the folder (Permission denied)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied_for_real(tmp_path: Path) -> None:
    path = save_checkpoint({"w": torch.ones(2, 2)}, tmp_path / "m", "file")
    path.chmod(0)
    try:
        refused(path, "Permission denied")
    finally:
        path.chmod(0o644)


def test_a_lone_surrogate_in_a_tensor_name_is_refused_and_shown_escaped(tmp_path: Path) -> None:
    header = '{"w\\ud800x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    message = refused(raw(tmp_path / "m.safetensors", header, 4), "lone surrogate", "'w\\ud800x'")
    assert "\ud800" not in message
    model = sharded(tmp_path / "model")
    (model / INDEX).write_text('{"weight_map": {"a\\udfff": "model-00001-of-00002.safetensors"}}')
    refused(model / INDEX, "lone surrogate", "'a\\udfff'")


@pytest.mark.parametrize(
    "header",
    [
        b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": "\xff"}}',
        '{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'.encode("utf-16-le"),
        b'{"w\xc0\x80": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',  # overlong NUL
    ],
)
def test_a_header_that_is_not_utf8(tmp_path: Path, header: bytes) -> None:
    refused(raw(tmp_path / "m.safetensors", header, 4), "not")


@pytest.mark.parametrize("metadata", [{"format": 1}, ["pt"], "pt", {"format": {"a": "b"}}, {"f": "\\ud800"}])
def test_metadata_must_map_strings_to_strings(tmp_path: Path, metadata: object) -> None:
    header = json.dumps({"__metadata__": metadata, "w": ENTRY}).replace("\\\\ud800", "\\ud800")
    refused(raw(tmp_path / "m.safetensors", header, 16), "__metadata__")


def test_null_metadata_and_unknown_fields_are_accepted_as_safetensors_does(tmp_path: Path) -> None:
    header = {"__metadata__": None, "w": {**ENTRY, "comment": [1, {"x": None}]}}
    with open_checkpoint(str(raw(tmp_path / "m.safetensors", header, 16))) as ck:
        assert ck.entries["w"].shape == (2, 2)


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_numbers_that_json_does_not_have(tmp_path: Path, number: str) -> None:
    """Python's json reads NaN, Infinity and 1e999 (as inf); the safetensors package refuses them, anywhere."""
    for field in ("shape", "comment"):
        header = '{"w": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0], "FIELD": [NUMBER]}}'
        header = header.replace('"shape": [0], ', "" if field == "shape" else '"shape": [0], ')
        path = raw(tmp_path / "m.safetensors", header.replace("FIELD", field).replace("NUMBER", number))
        refused(path, "not valid JSON")


def test_minus_zero_is_no_size(tmp_path: Path) -> None:
    """JSON readers without signed integers (the safetensors package) read -0 as a float; Python reads 0."""
    refused(raw(tmp_path / "m.safetensors", '{"w": {"dtype": "U8", "shape": [-0], "data_offsets": [0, 0]}}'), "'w'")


def test_integers_too_long_to_be_sizes(tmp_path: Path) -> None:
    header = '{"w": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 16]}}'
    refused(raw(tmp_path / "m.safetensors", header, 16), "integer of 5000 digits")


# ---------------------------------------------------------------------------------------------------- 4. misreads


def entry(begin: int, end: int, shape: list[int] | None = None) -> dict[str, object]:
    return {"dtype": "U8", "shape": shape if shape is not None else [end - begin], "data_offsets": [begin, end]}


@pytest.mark.parametrize(
    ("tensors", "size", "fragments"),
    [
        ({"a": entry(0, 8), "b": entry(4, 12)}, 12, ("'a' and 'b' overlap",)),
        ({"a": entry(0, 8), "b": entry(0, 8)}, 8, ("'a' and 'b' overlap",)),
        ({"a": entry(0, 8), "z": entry(4, 4)}, 8, ("'a' and 'z' overlap",)),  # an empty tensor inside another
        ({"a": entry(4, 8)}, 8, ("4 bytes before tensor 'a'", "gap")),
        ({"a": entry(0, 4), "b": entry(6, 8)}, 8, ("2 bytes before tensor 'b'",)),
        ({"a": entry(0, 4)}, 8, ("4 bytes after the last tensor",)),
        ({}, 3, ("3 bytes after",)),
    ],
)
def test_data_ranges_must_tile_the_file_as_safetensors_requires(
    tmp_path: Path, tensors: dict[str, object], size: int, fragments: tuple[str, ...]
) -> None:
    refused(raw(tmp_path / "m.safetensors", tensors, size), *fragments)


def test_zero_byte_tensors_may_share_a_position(tmp_path: Path) -> None:
    tensors = {"e": entry(0, 0, [0, 3]), "f": entry(0, 0, [0]), "a": entry(0, 4), "g": entry(4, 4, [2, 0])}
    with open_checkpoint(str(raw(tmp_path / "m.safetensors", tensors, 4))) as ck:
        assert ck.read("e").shape == (0, 3) and ck.read("a").tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize(
    "header",
    [
        '{"w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}, "w": {"dtype": "U8", "shape": [4], '
        '"data_offsets": [4, 8]}}',
        '{"w": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}, "w": {"dtype": "U8", "shape": [8], '
        '"data_offsets": [0, 8]}}',
        '{"w": {"dtype": "U8", "dtype": "I8", "shape": [8], "data_offsets": [0, 8]}}',
        '{"__metadata__": {"a": "1"}, "__metadata__": {}, "w": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}}',
    ],
)
def test_a_duplicate_key_in_a_header_is_refused(tmp_path: Path, header: str) -> None:
    message = refused(raw(tmp_path / "m.safetensors", header, 8), "appears twice")
    assert any(f"key '{k}'" in message for k in ("w", "dtype", "__metadata__"))


def test_a_duplicate_key_in_an_index_is_refused(tmp_path: Path) -> None:
    model = sharded(tmp_path / "model")
    one, two = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    (model / INDEX).write_text(f'{{"weight_map": {{"a.weight": "{two}", "b.weight": "{two}", "a.weight": "{one}"}}}}')
    refused(model / INDEX, "key 'a.weight' appears twice")


def test_the_same_tensor_in_two_shards_is_refused(tmp_path: Path) -> None:
    model = sharded(tmp_path / "model")
    one, two = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_file({"a.weight": torch.full((2, 2), 7.0), "b.weight": torch.zeros(3, 2)}, str(model / two))
    refused(model / INDEX, "tensor 'a.weight' is in two shards", one, two, f"the index names '{one}'")


def test_a_tensor_the_index_places_in_another_shard_is_refused(tmp_path: Path) -> None:
    model = sharded(tmp_path / "model")
    one, two = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    (model / INDEX).write_text(json.dumps({"weight_map": {"a.weight": two, "b.weight": two}}))
    save_file({"c": torch.zeros(1)}, str(model / two))
    (model / one).unlink()
    refused(model / INDEX, "tensor 'a.weight' is listed in the index but not in its shard")
    save_checkpoint({"a.weight": torch.ones(2, 2), "b.weight": torch.zeros(3, 2)}, model, "shards")
    (model / INDEX).write_text(json.dumps({"weight_map": {"a.weight": two, "b.weight": two, "x": one}}))
    refused(model / INDEX, f"the index puts tensor 'a.weight' in shard '{two}', but it is in '{one}'")


def test_tensors_the_index_does_not_list_are_kept_as_transformers_keeps_them(tmp_path: Path) -> None:
    model = sharded(tmp_path / "model")
    (model / INDEX).write_text(json.dumps({"weight_map": {"a.weight": "model-00001-of-00002.safetensors"}}))
    with open_checkpoint(str(model)) as ck:  # shard 2 is not listed: not read
        assert set(ck.entries) == {"a.weight"}
    save_file({"a.weight": torch.ones(2, 2), "extra": torch.ones(1)}, str(model / "model-00001-of-00002.safetensors"))
    with open_checkpoint(str(model)) as ck:
        assert set(ck.entries) == {"a.weight", "extra"}


def test_two_names_for_one_shard_read_it_once(tmp_path: Path) -> None:
    model = sharded(tmp_path / "model")
    one, two = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    (model / INDEX).write_text(json.dumps({"weight_map": {"a.weight": one, "b.weight": f"./{two}", "c": two}}))
    save_file({"b.weight": torch.zeros(3, 2), "c": torch.ones(1)}, str(model / two))
    with open_checkpoint(str(model)) as ck:
        assert set(ck.entries) == {"a.weight", "b.weight", "c"}


def test_unknown_fields_are_held_to_what_safetensors_reads(tmp_path: Path) -> None:
    def with_field(value: str) -> Path:
        header = '{"w": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0], "zz": ' + value + "}}"
        return raw(tmp_path / "m.safetensors", header)

    assert read_header(with_field("[" * 125 + "]" * 125))["w"].shape == (0,)
    refused(with_field("[" * 126 + "]" * 126), "field 'zz' holds more than 125 levels of nesting")
    refused(with_field('{"a": ["\\udc00"]}'), "field 'zz' holds a lone surrogate")


SAFETENSORS_CASES = {  # name: (header, data bytes); spectra's verdict must equal the safetensors package's
    "plain": ({"a": entry(0, 8)}, 8),
    "gap": ({"a": entry(4, 8)}, 8),
    "trailing": ({"a": entry(0, 4)}, 8),
    "overlap": ({"a": entry(0, 8), "b": entry(4, 8)}, 8),
    "empty header": ({}, 0),
    "empty header, data": ({}, 4),
    "zero-size shared": ({"a": entry(0, 0, [0]), "b": entry(0, 0, [0, 3]), "c": entry(0, 4)}, 4),
    "zero-size inside": ({"a": entry(0, 8), "b": entry(4, 4, [0])}, 8),
    "zero-size at end": ({"a": entry(0, 8), "b": entry(8, 8, [0])}, 8),
    "scalar": ({"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}, 4),
    "null metadata": ({"__metadata__": None, "a": entry(0, 4)}, 4),
    "int metadata": ({"__metadata__": {"x": 1}, "a": entry(0, 4)}, 4),
    "extra field": ({"a": {**entry(0, 4), "zz": [1, {"b": None}]}}, 4),
    "leading space": (' {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}', 4),
    "NUL padding": ('{"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}\x00', 4),
    "space padding": ('{"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}   ', 4),
    "NUL in name": ({"a\x00b": entry(0, 4)}, 4),
    "lowercase dtype": ({"a": {**entry(0, 4), "dtype": "u8"}}, 4),
    "float offset": ('{"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4.0]}}', 4),
    "three offsets": ({"a": {**entry(0, 4), "data_offsets": [0, 4, 4]}}, 4),
    "bool size": ('{"a": {"dtype": "U8", "shape": [true], "data_offsets": [0, 1]}}', 1),
    "top-level list": ("[]", 0),
    "lone surrogate": ('{"\\ud800": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}', 4),
    "BOM": ("\ufeff{}", 0),
    "nested 124": ({"a": {**entry(0, 0, [0]), "zz": json.loads("[" * 124 + "]" * 124)}}, 0),
    "nested 126": (
        '{"a": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0], "zz": ' + "[" * 126 + "]" * 126 + "}}",
        0,
    ),
    "NaN field": ('{"a": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0], "zz": NaN}}', 0),
    "-0 size": ('{"a": {"dtype": "U8", "shape": [-0], "data_offsets": [0, 0]}}', 0),
    "u64 size": ('{"a": {"dtype": "U8", "shape": [18446744073709551616], "data_offsets": [0, 0]}}', 0),
}


@pytest.mark.parametrize("name", list(SAFETENSORS_CASES))
def test_the_same_verdict_as_the_safetensors_package(tmp_path: Path, name: str) -> None:
    from safetensors import safe_open

    header, size = SAFETENSORS_CASES[name]
    path = raw(tmp_path / "m.safetensors", header, size)
    try:
        with safe_open(str(path), "np") as f:
            list(f.keys())
        theirs = True
    except Exception:
        theirs = False
    try:
        read_header(path)
        ours = True
    except CheckpointError:
        ours = False
    assert ours == theirs, f"spectra {'loads' if ours else 'refuses'}, safetensors {'loads' if theirs else 'refuses'}"


@pytest.mark.parametrize(
    ("header", "size", "why"),
    [
        (
            '{"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}, "a": {"dtype": "U8", "shape": [4], '
            '"data_offsets": [0, 4]}}',
            4,
            "appears twice",
        ),
        ({"a": {"dtype": "U16", "shape": [2], "data_offsets": [0, 4]}}, 4, "which spectra cannot read"),
        ({"a": entry(0, 0, [0, 2**64 - 1])}, 0, "more than 2^63"),
        ({"a": entry(0, 0, [0, 2**40, 2**40])}, 0, "more than 2^63"),
    ],
)
def test_where_spectra_is_stricter_than_safetensors(tmp_path: Path, header: object, size: int, why: str) -> None:
    """Loaded by the safetensors package, refused here: a duplicate key (the package keeps the last copy), a dtype
    spectra does not read, sizes torch cannot describe."""
    from safetensors import safe_open

    path = raw(tmp_path / "m.safetensors", header, size)
    with safe_open(str(path), "np") as f:
        list(f.keys())
    refused(path, why)


# ---------------------------------------------------------------------------------------------------- 5. python -O


def test_validation_survives_python_dash_o(tmp_path: Path) -> None:
    """Under `python -O` asserts vanish; the checks must not be asserts."""
    signal.setitimer(signal.ITIMER_REAL, 0)  # a child importing torch may take longer than no_hang allows
    script = textwrap.dedent(
        f"""
        import json, struct, sys
        from pathlib import Path
        assert False, "asserts are on"  # removed by -O
        from spectra import CheckpointError
        from spectra.io.checkpoint import open_checkpoint
        root = Path({str(tmp_path)!r})
        cases = []
        for i, weight_map in enumerate([["a"], {{"a": 3}}, "x", {{"a": {{"b": 1}}}}]):
            folder = root / f"index{{i}}"
            folder.mkdir()
            (folder / "{INDEX}").write_text(json.dumps({{"weight_map": weight_map}}))
            cases.append(folder)
        for i, meta in enumerate([[], {{"dtype": 1, "shape": [1], "data_offsets": [0, 4]}}, {{"dtype": "F32"}},
                                  {{"dtype": "F32", "shape": [1], "data_offsets": [0]}}]):
            header = json.dumps({{"w": meta}}).encode()
            path = root / f"header{{i}}.safetensors"
            path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
            cases.append(path)
        for case in cases:
            try:
                open_checkpoint(str(case))
            except CheckpointError as exc:
                assert "\\n" not in str(exc)
                print("refused", case.name)
            else:
                print("OPENED", case.name)
        """
    )
    done = subprocess.run([sys.executable, "-O", "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 8 and all(line.startswith("refused") for line in lines), done.stdout


# ---------------------------------------------------------------------------------------------------- 6. names


def test_control_characters_in_names_and_paths_never_reach_the_message_raw(tmp_path: Path) -> None:
    evil = "\x1b[31mred\nsecond line\r\x85\u2028"
    header = {evil: {"dtype": "F32", "shape": [3], "data_offsets": [0, 4]}}
    message = refused(raw(tmp_path / "m.safetensors", header, 4), "\\x1b[31mred\\nsecond line\\r\\x85\\u2028")
    assert "\x1b" not in message and "\n" not in message and "\u2028" not in message
    folder = tmp_path / "bad\x1bname"
    model = sharded(folder, {"a.weight": f"{evil}.safetensors"})
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(str(model))
    text = str(info.value)
    assert len(text.splitlines()) == 1 and "\x1b" not in text and "bad\\x1bname" in text and "missing" in text


def test_a_very_long_name_is_elided_in_messages(tmp_path: Path) -> None:
    name = "x" * 1_000_000
    message = refused(raw(tmp_path / "m.safetensors", {name: {"dtype": "F32"}}), "(1000000 characters)")
    assert len(message) < 600


def test_inputs_are_never_modified(tmp_path: Path) -> None:
    model = sharded(tmp_path / "model", {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "../x"})
    raw(tmp_path / "model" / "junk.safetensors", {"w": entry(0, 8)}, 4)
    before = digest(tmp_path)
    refused(model / INDEX, "outside")
    refused(tmp_path / "model" / "junk.safetensors", "truncated")
    assert digest(tmp_path) == before


def test_an_empty_matrix_with_a_huge_side_is_skipped_not_looped_over(tmp_path: Path) -> None:
    """Shape (10**15, 0) is legal safetensors (0 bytes); forming its ΔW used to loop 10**15/rows-per-chunk times."""
    from spectra import Options, analyze

    for name in ("base", "tuned"):
        header = {
            "e": {"dtype": "F32", "shape": [10**15, 0], "data_offsets": [0, 0]},
            "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        }
        raw = json.dumps(header).encode()
        data = struct.pack("<4f", 1, 2, 3, 4 if name == "base" else 5)
        (tmp_path / f"{name}.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    analysis = analyze(str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), Options(device="cpu"))
    assert [lm.name for lm in analysis.layers] == ["w"]
    assert {s.name: s.reason for s in analysis.skipped}["e"] == "not-2d"


def test_read_tensor_reads_a_scalar(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from spectra.io.checkpoint import open_checkpoint
    from spectra.io.tensors import read_tensor

    save_file({"s": torch.tensor(3.5)}, tmp_path / "s.safetensors")
    with open_checkpoint(str(tmp_path / "s.safetensors")) as ck:
        assert float(read_tensor(ck.entries["s"])) == 3.5
        assert float(ck.read("s")) == 3.5
