"""Property tests of the loader on generated hostile input: every safetensors header and shard index either loads
(and then describes the file exactly, and nothing outside the checkpoint folder was opened) or raises one
CheckpointError line naming the file; within a time bound per example (hypothesis' deadline).

The default run is derandomised (the same examples every time, a few seconds); `-m slow` runs many more, random.
benchmarks/fuzz_headers.py is the standalone, seeded 10,000-case version for headers.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from spectra import CheckpointError
from spectra.io.checkpoint import open_checkpoint
from spectra.io.header import DTYPES, ITEMSIZE, read_header

CODES = sorted(DTYPES)
INDEX = "model.safetensors.index.json"
FAST = settings(
    max_examples=800,
    deadline=timedelta(seconds=1),
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SLOW = settings(FAST, max_examples=20_000, derandomize=False)

# ---------------------------------------------------------------------------------------------------- strategies

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)
sizes = st.one_of(
    st.integers(min_value=0, max_value=6),
    st.integers(min_value=-3, max_value=2**66),
    st.sampled_from([2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64]),
)
names = st.one_of(
    st.integers(0, 99).map("model.layers.{}.mlp.weight".format),
    st.text(max_size=8).filter(lambda name: name != "__metadata__"),
    st.sampled_from(["", "\x1b[2J", "a\nb", "\u2028", "é" * 40]),
)


@st.composite
def valid_headers(draw: st.DrawFn) -> tuple[dict[str, Any], int]:
    header: dict[str, Any] = {}
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3))
    offset = 0
    for name in draw(st.lists(names, min_size=0, max_size=6, unique=True)):
        code = draw(st.sampled_from(CODES))
        shape = draw(st.lists(st.integers(min_value=0, max_value=5), max_size=3))
        nbytes = math.prod(shape) * ITEMSIZE[code]
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    return header, offset


KINDS = [
    "none",
    "dtype",
    "shape",
    "offsets",
    "field",
    "metadata",
    "entry",
    "nesting",
    "duplicate",
    "surrogate",
    "truncate",
    "bytes",
    "prefix",
    "data_size",
    "numbers",
    "encoding",
    "random",
]


@st.composite
def mutated_files(draw: st.DrawFn) -> tuple[bytes, list[str]]:
    """A safetensors file built from a valid header with one to three structured mutations; the kinds applied."""
    header, size = draw(valid_headers())
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=3))
    tensors = [k for k in header if k != "__metadata__"]
    target = header[draw(st.sampled_from(tensors))] if tensors else None
    for kind in kinds:
        if target is not None and kind == "dtype":
            target["dtype"] = draw(st.sampled_from(CODES) | st.sampled_from(["U16", "f32", "F4", ""]) | json_values)
        elif target is not None and kind == "shape":
            target["shape"] = draw(st.lists(sizes, max_size=5) | json_values)
        elif target is not None and kind == "offsets":
            target["data_offsets"] = draw(st.lists(sizes, min_size=0, max_size=3) | json_values)
        elif target is not None and kind == "field":
            target[draw(st.text(max_size=6))] = draw(json_values)
        elif target is not None and kind == "entry":
            header[draw(st.sampled_from(tensors))] = draw(json_values)
        elif kind == "metadata":
            header["__metadata__"] = draw(json_values)
        elif kind == "data_size":
            size = max(0, size + draw(st.integers(min_value=-64, max_value=64)))
    text = json.dumps(header, ensure_ascii=draw(st.booleans()))
    for kind in kinds:
        if kind == "nesting":
            depth = draw(st.integers(min_value=1, max_value=3000))
            inner = draw(st.sampled_from(["[" * depth + "]" * depth, '{"a":' * depth + "0" + "}" * depth]))
            text = text.replace('"shape": ', f'"x": {inner}, "shape": ', 1) if draw(st.booleans()) else inner
        elif kind == "duplicate" and tensors:
            name = draw(st.sampled_from(tensors))
            text = text[:-1] + ", " + json.dumps({name: header.get(name)})[1:-1] + "}"
        elif kind == "surrogate":
            text = text.replace('"', '"\\u' + draw(st.sampled_from(["d800", "dbff", "dc00", "dfff"])), 1)
        elif kind == "numbers":
            number = draw(st.sampled_from(["9" * 70, "1e999", "NaN", "-0", "-Infinity", "0.0", "1" * 21]))
            text = text.replace("0", number, 1)
    blob = text.encode("utf-8", "surrogatepass")
    if "encoding" in kinds:
        blob = draw(st.sampled_from(["utf-16-le", "utf-32", "latin-1"]))
        blob = text.encode(blob, "replace")
    if "bytes" in kinds and blob:
        flips = draw(st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(0, 255)), min_size=1, max_size=6))
        mutable = bytearray(blob)
        for at, value in flips:
            mutable[at] = value
        blob = bytes(mutable)
    if "random" in kinds:
        blob = draw(st.binary(max_size=64))
    prefix = len(blob)
    if "prefix" in kinds:
        prefix = draw(st.integers(min_value=0, max_value=2**64 - 1) | st.integers(prefix - 3, prefix + 3).map(abs))
    data = struct.pack("<Q", prefix) + blob + bytes(size)
    if "truncate" in kinds:
        data = data[: draw(st.integers(min_value=0, max_value=len(data)))]
    return data, kinds


# ---------------------------------------------------------------------------------------------------- checks


def describes_exactly(entries: dict[str, Any], size: int) -> None:
    spans = []
    for name, e in entries.items():
        assert e.name == name and e.nbytes == math.prod(e.shape) * ITEMSIZE[e.code]
        assert 8 <= e.start <= e.start + e.nbytes <= size
        assert all(type(d) is int and 0 <= d < 2**63 for d in e.shape)
        if e.nbytes:
            spans.append((e.start, e.start + e.nbytes))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), "overlapping tensors"


def one_line(exc: CheckpointError, path: Path) -> None:
    message = str(exc)
    assert len(message.splitlines()) == 1 and message.startswith(str(path)), message
    assert "\x1b" not in message
    message.encode("utf-8")


@contextmanager
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


def header_property(data: bytes, kinds: list[str], path: Path) -> None:
    path.write_bytes(data)
    try:
        entries = read_header(path)
    except CheckpointError as exc:
        one_line(exc, path)
    else:
        describes_exactly(entries, len(data))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-header") / "case.safetensors"


@FAST
@given(case=mutated_files())
def test_every_mutated_header_loads_or_is_refused_in_one_line(scratch: Path, case: tuple[bytes, list[str]]) -> None:
    header_property(*case, scratch)


@pytest.mark.slow
@SLOW
@given(case=mutated_files())
def test_every_mutated_header_long_run(scratch: Path, case: tuple[bytes, list[str]]) -> None:
    header_property(*case, scratch)


def test_unmutated_headers_load() -> None:
    """The generator's starting point is valid: the property is not vacuous."""

    @settings(FAST, max_examples=200)
    @given(valid_headers())
    def check(case: tuple[dict[str, Any], int]) -> None:
        header, size = case
        blob = json.dumps(header).encode()
        with workdir() as tmp:
            path = tmp / "ok.safetensors"
            path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(size))
            entries = read_header(path)
        assert set(entries) == set(header) - {"__metadata__"}

    check()


# ---------------------------------------------------------------------------------------------------- shard index

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def hostile_shard_names(outside: Path) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from(SHARDS),
        st.sampled_from(
            [
                "../outside/secret.safetensors",
                str(outside / "secret.safetensors"),
                "../../../../../../etc/passwd",
                "/etc/passwd",
                "/dev/zero",
                "link-out.safetensors",
                "fifo.safetensors",
                "sub",
                ".",
                "",
                "./" + SHARDS[0],
                "sub/../" + SHARDS[1],
                "a\x00b",
                "pytorch_model.bin",
                "\\ud800.safetensors",
            ]
        ),
        st.text(max_size=10),
        json_values,
    )


@st.composite
def index_documents(draw: st.DrawFn, outside: Path) -> str:
    """A shard index: the valid one for `hostile_folder`, with zero to three entries changed, dropped or added, and
    sometimes a broken structure or text."""
    keys = st.sampled_from(["a.weight", "b.weight", "secret.weight", "c"]) | st.text(max_size=6)
    weight_map: dict[str, Any] = {"a.weight": SHARDS[0], "b.weight": SHARDS[1], "c": SHARDS[0]}
    for key, value in draw(st.lists(st.tuples(keys, hostile_shard_names(outside)), max_size=3)):
        weight_map[key] = value
    for key in draw(st.lists(st.sampled_from(sorted(weight_map)), max_size=2)):
        weight_map.pop(key, None)
    doc: Any = {"metadata": {"total_size": 40}, "weight_map": weight_map}
    shape = draw(st.sampled_from(["ok"] * 8 + ["no-map", "map-list", "top-list", "value"]))
    if shape == "no-map":
        doc = {"metadata": {}}
    elif shape == "map-list":
        doc["weight_map"] = list(weight_map.items())
    elif shape == "top-list":
        doc = [doc]
    elif shape == "value":
        doc = draw(json_values)
    text = json.dumps(doc).replace("\\\\ud800", "\\ud800")
    tweak = draw(st.sampled_from(["none"] * 6 + ["duplicate", "nesting", "truncate", "bytes"]))
    if tweak == "duplicate" and weight_map:
        key = next(iter(weight_map))
        text = text.replace('"weight_map": {', '"weight_map": {' + json.dumps({key: SHARDS[1]})[1:-1] + ", ", 1)
    elif tweak == "nesting":
        depth = draw(st.integers(min_value=1, max_value=3000))
        text = text.replace('"weight_map": ', '"weight_map": ' + "[" * depth + "]" * depth + ', "x": ', 1)
    elif tweak == "truncate":
        text = text[: draw(st.integers(0, len(text)))]
    elif tweak == "bytes" and text:
        at = draw(st.integers(0, len(text) - 1))
        text = text[:at] + draw(st.sampled_from(["\x00", "\xff", "{", "]", '"', "\\"])) + text[at + 1 :]
    return text


@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fuzz-index")
    model, outside = root / "model", root / "outside"
    model.mkdir()
    outside.mkdir()
    save_file({"a.weight": torch.ones(2, 2), "c": torch.ones(1)}, str(model / SHARDS[0]))
    save_file({"b.weight": torch.zeros(3, 2)}, str(model / SHARDS[1]))
    save_file({"secret.weight": torch.ones(4, 4)}, str(outside / "secret.safetensors"))
    (model / "link-out.safetensors").symlink_to(outside / "secret.safetensors")
    os.mkfifo(model / "fifo.safetensors")
    (model / "sub").mkdir()
    return model, outside


def index_property(text: str, model: Path) -> None:
    (model / INDEX).write_text(text, encoding="utf-8", errors="surrogatepass")
    opened: list[str] = []
    real_open: Callable[..., int] = os.open

    def spy(path: Any, *args: Any, **kw: Any) -> int:
        opened.append(os.path.realpath(path))
        return real_open(path, *args, **kw)

    inside = str(model.resolve())
    with mock.patch.object(os, "open", spy):
        try:
            with open_checkpoint(str(model)) as ck:
                entries = ck.entries
        except CheckpointError as exc:
            one_line(exc, model)
        else:
            assert entries and all(str(os.path.realpath(e.file)).startswith(inside) for e in entries.values())
            assert set(entries) <= {"a.weight", "b.weight", "c"}
    assert all(p.startswith(inside) for p in opened), opened


@settings(FAST, max_examples=400)
@given(data=st.data())
def test_every_hostile_index_loads_inside_its_folder_or_is_refused(
    hostile_folder: tuple[Path, Path], data: st.DataObject
) -> None:
    model, outside = hostile_folder
    index_property(data.draw(index_documents(outside)), model)


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_every_hostile_index_long_run(hostile_folder: tuple[Path, Path], data: st.DataObject) -> None:
    model, outside = hostile_folder
    index_property(data.draw(index_documents(outside)), model)


def test_the_fuzz_benchmark_runs_clean() -> None:
    """benchmarks/fuzz_headers.py, 2,000 of its seeded cases: no outcome but a load or a CheckpointError."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "fuzz_headers", Path(__file__).parents[1] / "benchmarks" / "fuzz_headers.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.run(2000, 18, 2.0, compare=False)
    assert set(result["outcomes"]) <= {"loaded", "CheckpointError"}, result["other_signatures"]
    assert result["outcomes"].get("loaded", 0) > 100 and result["outcomes"].get("CheckpointError", 0) > 1000
