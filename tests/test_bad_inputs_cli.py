"""Issue 18 through the command line: every hostile or broken input, output path, interrupt and memory limit ends in
its exit code and one line on stderr, with no traceback, nothing written and the inputs unchanged (hashed before
and after); outputs appear together or not at all; a killed run resumes, computing only the rest."""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner, Result

import spectra
import spectra.engine.kernels
import spectra.report.html
from conftest import save_checkpoint
from spectra import SpectraError
from spectra_cli.app import app

runner = CliRunner()
INDEX = "model.safetensors.index.json"
ROOT = Path(__file__).resolve().parents[1]


def invoke(*args: object) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def digest(root: Path) -> dict[str, str]:
    """Every file under `root` (links not followed) -> sha256: the inputs before and after a run."""
    found = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            found[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_symlink() or not p.is_dir():
            found[str(p.relative_to(root))] = "special"
    return found


def messages(stderr: str) -> list[str]:
    """The lines of stderr, less the one saying what is read (`spectra rank` starts with it)."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("reading ")]


def one_line(result: Result, code: int, *fragments: str) -> str:
    """The run exited `code` with exactly one `error:` line on stderr, no traceback, no raw control character."""
    output = result.stdout + result.stderr
    assert result.exit_code == code, output
    assert "Traceback" not in output and isinstance(result.exception, (SystemExit, type(None))), result.exception
    lines = messages(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "\x1b" not in result.stderr and "\r" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    """Every test here finishes within 20 s: a blocking open (a FIFO) fails the test instead of hanging the suite."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError("the command hung")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, 20.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def handlers_restored() -> Iterator[None]:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    assert {s: signal.getsignal(s) for s in before} == before


# ------------------------------------------------------------------------------------------ builders


def pair(where: Path, n: int = 3, names: list[str] | None = None, seed: int = 0) -> tuple[Path, Path]:
    """base/tuned files whose ΔW has rank 2 in each of `n` 12×10 matrices."""
    g = torch.Generator().manual_seed(seed)
    names = names or [f"model.layers.{i}.mlp.up_proj.weight" for i in range(n)]
    base = {name: torch.randn(12, 10, generator=g) for name in names}
    tuned = {k: v + torch.randn(12, 2, generator=g) @ torch.randn(2, 10, generator=g) for k, v in base.items()}
    where.mkdir(parents=True, exist_ok=True)
    save_file(base, where / "base.safetensors")
    save_file(tuned, where / "tuned.safetensors")
    return where / "base.safetensors", where / "tuned.safetensors"


def raw(path: Path, header: object, data: int | bytes = 0) -> Path:
    """A file with the 8-byte length, `header` (JSON-encoded unless str/bytes) and `data` (bytes, or a zero count)."""
    text = header if isinstance(header, (str, bytes)) else json.dumps(header)
    blob = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + (data if isinstance(data, bytes) else bytes(data)))
    return path


ENTRY = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


def sharded(where: Path, weight_map: dict[str, str] | None = None) -> Path:
    save_checkpoint({"a.weight": torch.ones(2, 2), "b.weight": torch.zeros(3, 2)}, where, "shards")
    if weight_map is not None:
        (where / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return where


def adapter(where: Path, **config: Any) -> Path:
    """A PEFT LoRA adapter (r = 2 on one q_proj) with `config` fields overriding the good ones."""
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    g = torch.Generator().manual_seed(0)
    where.mkdir(parents=True, exist_ok=True)
    save_file(
        {f"{module}.lora_A.weight": torch.randn(2, 8, generator=g), f"{module}.lora_B.weight": torch.randn(6, 2)},
        where / "adapter_model.safetensors",
    )
    good = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    (where / "adapter_config.json").write_text(json.dumps({**good, **config}))
    return where


# ------------------------------------------------------------------------------------------ the corpus

# each case builds its inputs under `inputs/` and returns (arguments before the outputs, exit code, fragments)
Case = Callable[[Path], tuple[list[object], int, tuple[str, ...]]]


def outside_shard(shard: str) -> Case:
    def build(inputs: Path) -> tuple[list[object], int, tuple[str, ...]]:
        (inputs / "outside").mkdir()
        save_file({"a.weight": torch.ones(2, 2)}, inputs / "outside" / "secret.safetensors")
        target = shard.replace("ABS", str(inputs / "outside" / "secret.safetensors"))
        folder = sharded(inputs / "model", {"a.weight": target, "b.weight": "model-00002-of-00002.safetensors"})
        return ["rank", folder, folder], 1, (INDEX,)

    return build


def fifo_as(where: str) -> Case:
    def build(inputs: Path) -> tuple[list[object], int, tuple[str, ...]]:
        base, _ = pair(inputs / "pair")
        if where == "file":
            os.mkfifo(inputs / "pipe.safetensors")
            return ["rank", base, inputs / "pipe.safetensors"], 1, ("FIFO",)
        folder = sharded(inputs / "model")
        os.unlink(folder / "model-00002-of-00002.safetensors")
        os.mkfifo(folder / "model-00002-of-00002.safetensors")
        return ["rank", folder, folder], 1, ("FIFO",)

    return build


def header_case(header: object, data: int | bytes, *fragments: str) -> Case:
    def build(inputs: Path) -> tuple[list[object], int, tuple[str, ...]]:
        base, _ = pair(inputs / "pair")
        bad = raw(inputs / "bad.safetensors", header, data)
        return ["rank", base, bad], 1, ("bad.safetensors", *fragments)

    return build


def adapter_case(*fragments: str, **config: Any) -> Case:
    def build(inputs: Path) -> tuple[list[object], int, tuple[str, ...]]:
        return ["rank", adapter(inputs / "adapter", **config)], 1, fragments

    return build


def text_case(name: str, text: str, command: str, *fragments: str) -> Case:
    def build(inputs: Path) -> tuple[list[object], int, tuple[str, ...]]:
        inputs.mkdir(exist_ok=True)
        (inputs / name).write_text(text)
        return [command, inputs / name], 1, fragments

    return build


def other(build: Callable[[Path], tuple[list[object], int, tuple[str, ...]]]) -> Case:
    return build


def _device(inputs: Path) -> tuple[list[object], int, tuple[str, ...]]:
    base, _ = pair(inputs / "pair")
    return ["rank", base, "/dev/zero"], 1, ("character device",)


def _surrogate(inputs: Path) -> tuple[list[object], int, tuple[str, ...]]:
    base, _ = pair(inputs / "pair")
    bad = raw(inputs / "bad.safetensors", '{"w\\ud800": ' + json.dumps(ENTRY) + "}", 16)
    return ["rank", base, bad], 1, ("\\ud800",)


def _two_shards(inputs: Path) -> tuple[list[object], int, tuple[str, ...]]:
    folder = sharded(inputs / "model")
    save_file(
        {"a.weight": torch.ones(2, 2), "b.weight": torch.zeros(3, 2)}, folder / "model-00002-of-00002.safetensors"
    )
    return ["rank", folder, folder], 1, ("a.weight",)


def _pickle(inputs: Path) -> tuple[list[object], int, tuple[str, ...]]:
    base, _ = pair(inputs / "pair")
    torch.save({"w": torch.ones(2, 2)}, inputs / "model.bin")
    return ["rank", base, inputs / "model.bin"], 1, ("never unpickles",)


def _truncated(inputs: Path) -> tuple[list[object], int, tuple[str, ...]]:
    base, tuned = pair(inputs / "pair")
    data = tuned.read_bytes()
    (inputs / "cut.safetensors").write_bytes(data[: len(data) - 100])
    return ["rank", base, inputs / "cut.safetensors"], 1, ("cut.safetensors",)


def _nan_with_a_hostile_name(inputs: Path) -> tuple[list[object], int, tuple[str, ...]]:
    name = "model.layers.0.\x1b[31mq_proj\nerror: fake.weight"
    base, tuned = pair(inputs / "pair", names=[name])
    poisoned = {name: torch.full((12, 10), float("nan"))}
    save_file(poisoned, tuned)
    return ["rank", base, tuned], 1, ("\\x1b[31mq_proj\\nerror: fake",)


def _fifo_analysis(inputs: Path) -> tuple[list[object], int, tuple[str, ...]]:
    os.mkfifo(inputs / "a.json")
    return ["report", inputs / "a.json"], 1, ("not a regular file",)


def _unreadable(inputs: Path) -> tuple[list[object], int, tuple[str, ...]]:  # pragma: no cover - not as root
    folder = sharded(inputs / "model")
    os.chmod(folder, 0)
    return ["rank", folder, folder], 1, ("permission",)


CORPUS: dict[str, Case] = {
    # 1. reads outside the checkpoint folder
    "shard ../outside": outside_shard("../outside/secret.safetensors"),
    "shard absolute": outside_shard("ABS"),
    "shard /etc/passwd": outside_shard("../../../../../../../../etc/passwd"),
    # 4. hangs: a FIFO where a shard or a file should be; a huge shape over zero bytes
    "fifo as the file": fifo_as("file"),
    "fifo as a shard": fifo_as("shard"),
    "huge shape, zero bytes": header_case({"w": {"dtype": "F32", "shape": [10**9, 10**9], "data_offsets": [0, 0]}}, 0),
    # 5. tracebacks: nesting, int64 overflow, devices, adapters, surrogates
    "deeply nested header": header_case("[" * 100_000 + "]" * 100_000, 0),
    "shape overflowing int64": header_case(
        {"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}, 16
    ),
    "shape of huge ints": header_case({"w": {"dtype": "F32", "shape": [10**30, 1], "data_offsets": [0, 16]}}, 16),
    "character device": other(_device),
    "adapter r = inf": adapter_case("r must be a positive integer", r=math.inf),
    "adapter lora_alpha = nan": adapter_case("lora_alpha", lora_alpha=math.nan),
    "adapter lora_alpha = inf": adapter_case("lora_alpha", lora_alpha=math.inf),
    "rank_pattern inline flag": adapter_case("not a valid regular expression", rank_pattern={"a(?i)q_proj": 1}),
    "lone surrogate in a name": other(_surrogate),
    "deeply nested analysis (report)": text_case("a.json", "[" * 100_000 + "]" * 100_000, "report", "a.json"),
    "deeply nested analysis (recommend)": text_case("a.json", "[" * 100_000 + "]" * 100_000, "recommend", "a.json"),
    "fifo as the analysis": other(_fifo_analysis),
    "not an analysis": text_case("a.json", '{"format": "spectra.analysis/0"}', "report", "not a spectra analysis"),
    # 6. silent misreads
    "overlapping offsets": header_case(
        {"a": ENTRY, "b": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}}, 24
    ),
    "duplicate key": header_case('{"w": ' + json.dumps(ENTRY) + ', "w": ' + json.dumps(ENTRY) + "}", 16, "'w'"),
    "a tensor in two shards": other(_two_shards),
    # and the everyday ones
    "pickle": other(_pickle),
    "truncated": other(_truncated),
    "not safetensors": text_case("x.safetensors", "not a checkpoint", "rank", "x.safetensors"),
    "NaN under a hostile name": other(_nan_with_a_hostile_name),
}
if os.geteuid() != 0:  # pragma: no cover - root reads anything
    CORPUS["unreadable folder"] = other(_unreadable)


@pytest.mark.parametrize("case", list(CORPUS), ids=list(CORPUS))
def test_every_bad_input_is_one_line_nothing_written_inputs_unchanged(tmp_path: Path, case: str) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    args, code, fragments = CORPUS[case](inputs)
    before = digest(inputs)
    out = tmp_path / "out"
    outputs = ["--json", out / "a.json", "--html", out / "a.html"] if args[0] == "rank" else ["-o", out / "a.html"]
    if args[0] == "recommend":
        outputs = ["-o", out / "cfg"]
    one_line(invoke(*args, *outputs), code, *fragments)
    assert not out.exists()  # not even the folder made for the outputs
    assert digest(inputs) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]


# ------------------------------------------------------------------------------------------ 2. inputs destroyed


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    base, tuned = pair(tmp_path / "in")
    folder = tmp_path / "in" / "folder"
    save_checkpoint({"model.layers.0.mlp.up_proj.weight": torch.randn(12, 10)}, folder, "folder")
    shards = sharded(tmp_path / "in" / "shards")
    return {"base": base, "tuned": tuned, "folder": folder, "shards": shards}


@pytest.mark.parametrize("flag", ["--json", "--html"])
@pytest.mark.parametrize(
    ("inputs_of", "target"),
    [
        ("pair", lambda i: i["tuned"]),
        ("pair", lambda i: i["base"]),
        ("pair", lambda i: i["tuned"].parent / "." / i["tuned"].name),
        ("folder", lambda i: i["folder"] / "model.safetensors"),
        ("folder", lambda i: i["folder"]),
        ("shards", lambda i: i["shards"] / INDEX),
        ("shards", lambda i: i["shards"] / "model-00001-of-00002.safetensors"),
    ],
)
def test_an_output_that_is_an_input_is_refused_before_computing(
    inputs: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    flag: str,
    inputs_of: str,
    target: Callable[[dict[str, Path]], Path],
) -> None:
    recorder = Recorder(monkeypatch)
    args = {
        "pair": (inputs["base"], inputs["tuned"]),
        "folder": (inputs["base"], inputs["folder"]),
        "shards": (inputs["shards"], inputs["shards"]),
    }[inputs_of]
    root = inputs["base"].parent
    before = digest(root)
    other = "--html" if flag == "--json" else "--json"
    one_line(invoke("rank", *args, other, root / "x.out", flag, target(inputs)), 2, flag, "input")
    assert digest(root) == before and recorder.names == []
    assert not (root / "x.out").exists()


def test_json_and_html_on_one_path_are_refused_naming_both(inputs: dict[str, Path], tmp_path: Path) -> None:
    line = one_line(
        invoke("rank", inputs["base"], inputs["tuned"], "--json", tmp_path / "x", "--html", tmp_path / "x"), 2
    )
    assert "--json" in line and "--html" in line and "same file" in line
    assert not (tmp_path / "x").exists()


def test_report_and_recommend_cannot_overwrite_their_analysis(inputs: dict[str, Path], tmp_path: Path) -> None:
    analysis = tmp_path / "a.json"
    assert invoke("rank", inputs["base"], inputs["tuned"], "--json", analysis).exit_code == 0
    before = analysis.read_bytes()
    one_line(invoke("report", analysis, "-o", analysis), 2, "--output", "is the input")
    one_line(invoke("recommend", analysis, "-o", analysis), 2, "--output", "is the input")
    (tmp_path / "link.html").symlink_to(analysis)
    one_line(invoke("report", analysis, "-o", tmp_path / "link.html"), 2, "is the input")
    assert analysis.read_bytes() == before


@pytest.mark.parametrize("where", ["/dev/null", "fifo", "folder"])
def test_outputs_that_are_not_files_are_refused(inputs: dict[str, Path], tmp_path: Path, where: str) -> None:
    path = Path(where) if where.startswith("/") else tmp_path / where
    if where == "fifo":
        os.mkfifo(path)
    elif where == "folder":
        path.mkdir()
    one_line(invoke("rank", inputs["base"], inputs["tuned"], "--json", path), 2, "--json")
    assert Path("/dev/null").is_char_device()


def test_a_new_file_in_an_input_folder_is_fine(inputs: dict[str, Path]) -> None:
    result = invoke("rank", inputs["base"], inputs["folder"], "--json", inputs["folder"] / "analysis.json")
    assert result.exit_code == 0, result.output
    assert json.loads((inputs["folder"] / "analysis.json").read_text())["format"] == "spectra.analysis/1"


@pytest.mark.parametrize(
    "command",
    [
        lambda i, t: ["compare", i["base"], i["tuned"], t / "b.safetensors", "--json", i["tuned"]],
        lambda i, t: ["compare", i["base"], i["tuned"], t / "b.safetensors", "--html", i["base"]],
        lambda i, t: ["trajectory", i["base"], i["tuned"], t / "b.safetensors", "--html", t / "b.safetensors"],
        lambda i, t: ["rank", i["base"], i["tuned"], t / "b.safetensors", "--json", i["tuned"]],
        lambda i, t: ["extract", i["base"], i["tuned"], "-o", i["base"].parent, "--rank", "2", "--overwrite"],
        lambda i, t: ["extract", i["base"], i["tuned"], "-o", t / "ad", "--json", t / "ad" / "x.json", "--rank", "2"],
        lambda i, t: ["resize", i["folder"], "-o", i["folder"], "--rank", "2", "--overwrite"],
    ],
)
def test_every_command_refuses_an_output_that_is_an_input(
    inputs: dict[str, Path], tmp_path: Path, command: Callable[[dict[str, Path], Path], list[object]]
) -> None:
    pair(tmp_path / "b", seed=1)
    (tmp_path / "b" / "tuned.safetensors").rename(tmp_path / "b.safetensors")
    before = digest(tmp_path)
    one_line(invoke(*command(inputs, tmp_path)), 2)
    assert digest(tmp_path) == before


def test_extract_writes_the_adapter_and_its_json_together(
    inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, record = tmp_path / "adapter", tmp_path / "adapter.json"
    args = ["extract", inputs["base"], inputs["tuned"], "-o", out, "--json", record, "--rank", "2"]

    def broken(result: object, path: object) -> None:
        raise SpectraError("the summary cannot be written")

    monkeypatch.setattr(spectra, "save_extraction", broken)
    one_line(invoke(*args), 1, "summary")
    assert not out.exists() and not record.exists()  # no adapter without its summary
    monkeypatch.undo()
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads(record.read_text())["out_dir"] == str(out)  # the folder's name, not the staged one's
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ------------------------------------------------------------------------------------------ 3. names are data

HOSTILE = "model.layers.0.\x1b]0;owned\x07\x1b[2J<img src=x onerror=alert(1)>\tq\nproj.weight"


def test_names_are_escaped_in_tsv_tables_and_messages_verbatim_in_json(tmp_path: Path) -> None:
    names = [HOSTILE, "model.layers.1.mlp.up_proj.weight"]
    base, tuned = pair(tmp_path / "in", names=names)
    result = invoke("rank", base, tuned, "--tsv", "--json", tmp_path / "a.json", "--html", tmp_path / "a.html")
    assert result.exit_code == 0, result.output
    rows = result.stdout.rstrip("\n").split("\n")
    assert len(rows) == 3 and len({len(row.split("\t")) for row in rows}) == 1  # nothing split a row
    assert not any(c in result.stdout for c in "\x1b\x07\r") and "\\x1b]0;owned\\x07" in result.stdout
    assert {layer["name"] for layer in json.loads((tmp_path / "a.json").read_text())["layers"]} == set(names)
    html = (tmp_path / "a.html").read_text()
    assert "<img src=x" not in html and "&lt;img src=x" in html
    table = invoke("rank", base, tuned)
    assert table.exit_code == 0 and not any(c in table.stdout for c in "\x1b\x07"), table.stdout


# ------------------------------------------------------------------------------------------ 5. memory limits


@pytest.mark.parametrize(
    ("error", "limited", "fragment"),
    [
        (RuntimeError("could not create a primitive"), True, "address-space limit (ulimit -v) is 700 MiB"),
        (
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                "you tried to allocate 4194304 bytes. Error code 12 (Cannot allocate memory)"
            ),
            True,
            "ulimit -v",
        ),
        (MemoryError("std::bad_alloc"), True, "out of memory (std::bad_alloc)"),
        (RuntimeError("can't start new thread"), True, "ulimit -v"),
        (ImportError("libtorch_cpu.so: failed to map segment from shared object"), True, "ulimit -v"),
        (MemoryError(), False, "lower --batch-bytes"),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), False, "out of GPU memory"),
        (RuntimeError("can't start new thread"), False, "lower --threads"),
    ],
)
def test_allocation_failures_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException, limited: bool, fragment: str
) -> None:
    base, tuned = pair(tmp_path / "in")

    def fail(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(spectra.engine.kernels.Values, "compute", fail)
    real = resource.getrlimit
    limit = 700 << 20 if limited else resource.RLIM_INFINITY
    monkeypatch.setattr(resource, "getrlimit", lambda r: (limit, limit) if r == resource.RLIMIT_AS else real(r))
    result = invoke("rank", base, tuned, "--json", tmp_path / "out" / "a.json")
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = messages(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_a_primitive_failure_without_a_limit_is_a_bug(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, tuned = pair(tmp_path / "in")
    monkeypatch.setattr(
        spectra.engine.kernels.Values,
        "compute",
        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("could not create a primitive")),
    )
    monkeypatch.setattr(resource, "getrlimit", lambda r: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    result = invoke("rank", base, tuned)
    assert isinstance(result.exception, RuntimeError)  # not said to be memory: it is not known to be


@pytest.mark.slow
@pytest.mark.parametrize("mib", [350, 600, 700, 760, 800, 900])
def test_real_address_space_limits(tmp_path: Path, mib: int) -> None:
    """Under `ulimit -v`, torch fails in many ways (a library that cannot be mapped, bad_alloc, a oneDNN primitive,
    a thread); each is one line naming the limit, or the run succeeds. Nothing else."""
    base, tuned = pair(tmp_path / "in", n=6)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (mib << 20, resource.RLIM_INFINITY))

    out = tmp_path / "out" / "a.json"
    done = subprocess.run(
        [sys.executable, "-m", "spectra_cli", "rank", base, tuned, "--json", out],
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=120,
        cwd=tmp_path,
    )
    lines = messages(done.stderr)
    if done.returncode == 0:
        assert out.exists()
        return
    assert done.returncode == 1, done.stderr
    assert len(lines) == 1 and "ulimit -v" in lines[0] and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ 7. all-or-nothing


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("when", ["writing the json", "rendering the html"])
def test_an_interrupt_while_writing_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, handlers_restored: None, signum: int, when: str
) -> None:
    base, tuned = pair(tmp_path / "in")
    if when == "writing the json":
        real_write_temp = spectra.io.files.write_temp

        def write_temp(target: Path, data: bytes) -> Path:  # inside write_atomic: the JSON's temp file is complete
            tmp = real_write_temp(target, data)
            os.kill(os.getpid(), signum)
            return tmp

        monkeypatch.setattr(spectra.io.files, "write_temp", write_temp)
    else:  # the JSON is staged already
        monkeypatch.setattr(spectra.report.html, "render_html", lambda analysis: os.kill(os.getpid(), signum) or "")
    out = tmp_path / "out"
    result = invoke("rank", base, tuned, "--json", out / "a.json", "--html", out / "a.html")
    line = one_line(result, 128 + signum, "interrupted; no output was written")
    assert "journal" in line  # the completed matrices are kept to resume
    assert sorted(p.name for p in out.iterdir()) == ["a.json.journal"]  # no .a.json.*.tmp, no JSON alone


def test_a_failure_in_the_html_step_leaves_nothing_and_says_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, tuned = pair(tmp_path / "in")

    def broken(analysis: object) -> str:
        raise SpectraError("the report template is missing")

    monkeypatch.setattr(spectra.report.html, "render_html", broken)
    out = tmp_path / "out"
    one_line(invoke("rank", base, tuned, "--json", out / "a.json", "--html", out / "a.html"), 1, "template")
    assert sorted(p.name for p in out.iterdir()) == ["a.json.journal"]


def test_a_bug_in_the_html_step_still_leaves_no_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, tuned = pair(tmp_path / "in")
    monkeypatch.setattr(spectra.report.html, "render_html", lambda analysis: 1 / 0)
    result = invoke("rank", base, tuned, "--json", tmp_path / "a.json", "--html", tmp_path / "a.html")
    assert isinstance(result.exception, ZeroDivisionError)  # a bug keeps its traceback
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json.journal", "in"]


def test_outputs_appear_together_and_the_journal_goes(tmp_path: Path) -> None:
    base, tuned = pair(tmp_path / "in")
    out = tmp_path / "out"
    result = invoke("rank", base, tuned, "--json", out / "a.json", "--html", out / "a.html")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["a.html", "a.json"]
    assert [line for line in result.stderr.splitlines() if line.startswith("wrote")] == [
        f"wrote {out / 'a.json'}",
        f"wrote {out / 'a.html'}",
    ]


# ------------------------------------------------------------------------------------------ 9. interrupt messages


def test_an_interrupt_after_the_outputs_are_in_place_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, handlers_restored: None
) -> None:
    base, tuned = pair(tmp_path / "in")
    real_replace = os.replace
    sent: list[int] = []

    def replace(src: Any, dst: Any) -> None:
        if Path(dst) == out / "a.json" and not sent:
            sent.append(signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the outputs are being renamed into place
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "out"
    result = invoke("rank", base, tuned, "--json", out / "a.json", "--html", out / "a.html")
    line = one_line(result, 130, "interrupted after the outputs were written in full")
    assert "no output was written" not in line
    assert sorted(p.name for p in out.iterdir()) == ["a.html", "a.json"]  # both, complete
    json.loads((out / "a.json").read_text())


def test_an_interrupt_with_no_outputs_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, tuned = pair(tmp_path / "in")
    monkeypatch.setattr(spectra.engine.kernels.Values, "compute", lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM))
    one_line(invoke("rank", base, tuned), 143, "interrupted; no output was written")


def run_command_line(argv: list[object], monkeypatch: pytest.MonkeyPatch) -> int:
    """spectra_cli.console.run(app) as the `spectra` executable runs it (its handlers restored afterwards)."""
    from spectra_cli.app import app as command_line
    from spectra_cli.console import run

    monkeypatch.setattr(sys, "argv", ["spectra", *map(str, argv)])
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as exited:
            run(command_line)
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
    return int(exited.value.code or 0)


def test_a_signal_while_the_parser_runs_reaches_the_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    import typer.main

    base, tuned = pair(tmp_path / "in")
    real = typer.main.get_command

    def get_command(app: Any) -> Any:  # typer builds the click command: no handler of its own would catch it
        os.kill(os.getpid(), signal.SIGTERM)
        return real(app)

    monkeypatch.setattr(typer.main, "get_command", get_command)
    assert run_command_line(["rank", base, tuned, "--json", tmp_path / "a.json"], monkeypatch) == 143
    assert messages(capfd.readouterr().err) == ["error: interrupted; no output was written"]
    assert not (tmp_path / "a.json").exists()


def test_a_signal_after_the_command_finished_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    import spectra_cli.outputs

    base, tuned = pair(tmp_path / "in")
    real = spectra_cli.outputs.wrote

    def wrote(path: object) -> None:  # the outputs are in place; the results are being printed
        os.kill(os.getpid(), signal.SIGINT)
        real(path)

    monkeypatch.setattr(spectra_cli.outputs, "wrote", wrote)
    assert run_command_line(["rank", base, tuned, "--json", tmp_path / "a.json"], monkeypatch) == 0
    assert "interrupted" not in capfd.readouterr().err and (tmp_path / "a.json").exists()


# ------------------------------------------------------------------------------------------ resume


def comparable(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    del data["elapsed_s"], data["created"]
    return data


REAL_COMPUTE = spectra.engine.kernels.Values.compute


class Recorder:
    """Values.compute that records which matrices it computed, and raises Ctrl-C after `stop_after` of them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, stop_after: int | None = None) -> None:
        self.names: list[str] = []
        self.stop_after = stop_after

        def compute(kernel: Any, deltas: Any, threads: int | None = None) -> Any:
            if self.stop_after is not None and len(self.names) >= self.stop_after:
                raise KeyboardInterrupt
            self.names.extend(d.name for d in deltas)
            return REAL_COMPUTE(kernel, deltas, threads)

        monkeypatch.setattr(spectra.engine.kernels.Values, "compute", compute)


def journaled(path: Path) -> set[str]:
    return {json.loads(line)["name"] for line in path.read_text().splitlines()[1:]}


def test_a_stopped_rank_resumes_computing_only_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, tuned = pair(tmp_path / "in", n=12)
    reference = tmp_path / "reference.json"
    assert invoke("rank", base, tuned, "--json", reference, "--threads", "1").exit_code == 0
    out = tmp_path / "out" / "a.json"
    journal = tmp_path / "out" / "a.json.journal"
    Recorder(monkeypatch, stop_after=5)
    line = one_line(invoke("rank", base, tuned, "--json", out, "--threads", "1"), 130, "no output was written")
    kept = journaled(journal)
    assert 0 < len(kept) <= 5 and f"{len(kept)} completed matrices are kept in" in line
    again = Recorder(monkeypatch)
    result = invoke("rank", base, tuned, "--json", out, "--threads", "1")
    assert result.exit_code == 0, result.output
    assert f"resuming: {len(kept)} of 12 matrices" in result.stderr
    assert sorted(again.names) == sorted({f"model.layers.{i}.mlp.up_proj.weight" for i in range(12)} - kept)
    assert comparable(out) == comparable(reference)
    assert not journal.exists()


def test_resume_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, tuned = pair(tmp_path / "in", n=6)
    out = tmp_path / "a.json"
    one_line(invoke("rank", base, tuned, "--resume"), 2, "--resume needs --json or --html")
    one_line(invoke("rank", base, tuned, "--json", out, "--resume"), 2, "no journal")
    Recorder(monkeypatch, stop_after=3)
    invoke("rank", base, tuned, "--json", out, "--threads", "1")
    monkeypatch.undo()
    result = invoke("rank", base, tuned, "--json", out, "--precision", "exact")  # other settings: a note
    assert result.exit_code == 0 and "ignored the journal" in result.stderr and "another --precision" in result.stderr
    Recorder(monkeypatch, stop_after=3)
    invoke("rank", base, tuned, "--json", out, "--threads", "1")
    again = Recorder(monkeypatch)
    assert invoke("rank", base, tuned, "--json", out, "--no-resume").exit_code == 0
    assert len(again.names) == 6  # started afresh


# ------------------------------------------------------------------------------------------ real processes

DRIVER = textwrap.dedent(
    """
    import pathlib, sys, time
    mark, after, delay, log = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    import spectra.engine.kernels as kernels
    real = kernels.Values.compute
    done = [0]
    def compute(self, deltas, threads=None):
        out = real(self, deltas, threads)
        with open(log, "a") as fh:
            fh.writelines(d.name + "\\n" for d in deltas)
        done[0] += len(deltas)
        if done[0] >= after:
            pathlib.Path(mark).touch()
            time.sleep(delay)
        return out
    kernels.Values.compute = compute
    sys.argv = ["spectra", *sys.argv[5:]]
    from spectra_cli.launch import main
    main()
    """
)


def drive(
    tmp_path: Path, args: list[object], after: int, delay: float, log: Path
) -> tuple[subprocess.Popen[str], Path]:
    mark = tmp_path / f"mark-{time.monotonic_ns()}"
    argv = [sys.executable, "-c", DRIVER, mark, after, delay, log, *args]
    return subprocess.Popen(
        [str(a) for a in argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    ), mark


def wait_for(path: Path, process: subprocess.Popen[str], timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < end, "the run never got there"
        time.sleep(0.02)


@pytest.mark.slow
def test_ctrl_c_twice_during_compute_is_one_line_and_never_sigabrt(tmp_path: Path) -> None:
    base, tuned = pair(tmp_path / "in", n=16)
    out = tmp_path / "out"
    process, mark = drive(tmp_path, ["rank", base, tuned, "--json", out / "a.json"], 2, 0.3, tmp_path / "log")
    wait_for(mark, process)
    for _ in range(3):
        process.send_signal(signal.SIGINT)
        time.sleep(0.05)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    lines = messages(stderr)
    assert len(lines) == 1 and lines[0].startswith("error: interrupted; no output was written"), stderr
    assert "terminate called" not in stderr and "Traceback" not in stderr
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == ["a.json.journal"]  # a journal, if any


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.3, 0.8, 1.5])  # before ~0.1 s Python itself is starting (site, .pth files)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_during_start_up_is_quiet(tmp_path: Path, delay: float, signum: int) -> None:
    base, tuned = pair(tmp_path / "in")
    process = subprocess.Popen(
        [sys.executable, "-m", "spectra_cli", "rank", str(base), str(tuned), "--json", str(tmp_path / "a.json")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(delay)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert "Traceback" not in stderr and len(messages(stderr)) <= 1, stderr
    # killed by the signal only before Python's own handler exists; else one line and 128 + signal; or done already
    assert process.returncode in (0, 128 + signum, -signum), stderr
    if process.returncode != 0:
        assert not (tmp_path / "a.json").exists()


@pytest.mark.slow
def test_a_killed_run_resumes_with_only_the_rest(tmp_path: Path) -> None:
    """SIGKILL (no cleanup at all) after some matrices are journaled; the same command again computes only the
    others, and its JSON equals an uninterrupted run's."""
    base, tuned = pair(tmp_path / "in", n=16)
    reference = tmp_path / "reference.json"
    assert invoke("rank", base, tuned, "--json", reference).exit_code == 0
    out = tmp_path / "out" / "a.json"
    journal = tmp_path / "out" / "a.json.journal"
    process, mark = drive(tmp_path, ["rank", base, tuned, "--json", out], 4, 0.3, tmp_path / "log1")
    wait_for(mark, process)
    while len(journal.read_text().splitlines()) < 1 + 4:
        time.sleep(0.02)
    process.kill()
    process.communicate()
    kept = journaled(journal)
    assert len(kept) >= 4 and not out.exists()
    process, _ = drive(tmp_path, ["rank", base, tuned, "--json", out], 10**6, 0, tmp_path / "log2")
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert f"resuming: {len(kept)} of 16 matrices" in stderr
    computed = (tmp_path / "log2").read_text().split()
    assert sorted(computed) == sorted({f"model.layers.{i}.mlp.up_proj.weight" for i in range(16)} - kept)
    assert comparable(out) == comparable(reference)
    assert not journal.exists()


@pytest.mark.slow
def test_the_installed_command_is_the_guarded_launcher() -> None:
    script = Path(sys.executable).parent / "spectra"
    if not script.exists():
        pytest.skip("no installed `spectra` script")
    assert "spectra_cli.launch" in script.read_text()
