"""read_lora_settings on hostile and broken adapter_config.json files: every input either gives LoraSettings or one
CheckpointError line (also under `python -O`), never another exception or a hang; the raw config is kept.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spectra import CheckpointError
from spectra.peft.read import LoraSettings, read_lora_settings

GOOD: dict[str, Any] = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "v_proj"],
    "rank_pattern": {"layers.0.self_attn.q_proj": 4},
    "alpha_pattern": {r"layers\.1\..*v_proj": 3.5},
    "use_rslora": False,
    "modules_to_save": None,
}
MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "lm_head")


def write(folder: Path, text: str | bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / "adapter_config.json"
    file.write_bytes(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    return folder


def one_line_error(folder: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        read_lora_settings(folder)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def test_good_config_and_raw_kept(tmp_path: Path) -> None:
    settings_ = read_lora_settings(write(tmp_path, json.dumps(GOOD)))
    assert settings_.raw == GOOD  # every field, dropout and task type included
    assert settings_.rank_and_alpha("model.layers.0.self_attn.q_proj") == (4, 16.0)
    assert settings_.rank_and_alpha("model.layers.1.self_attn.v_proj") == (8, 3.5)
    assert settings_.scale("lm_head") == 2.0
    assert settings_.r == 8 and isinstance(settings_.r, int) and settings_.lora_alpha == 16.0


def test_defaults_follow_peft(tmp_path: Path) -> None:
    """PEFT's LoraConfig defaults: r = 8, lora_alpha = 8; None patterns are empty."""
    got = read_lora_settings(write(tmp_path, '{"peft_type": "lora", "rank_pattern": null, "alpha_pattern": {}}'))
    assert (got.r, got.lora_alpha, got.rank_pattern, got.alpha_pattern) == (8, 8.0, {}, {})


BAD_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"r": float("inf")}, "r must be a positive integer"),
    ({"r": float("nan")}, "r must be a positive integer"),
    ({"r": 8.0}, "r must be a positive integer"),
    ({"r": "8"}, "r must be a positive integer"),
    ({"r": True}, "r must be a positive integer"),
    ({"r": 0}, "r must be a positive integer"),
    ({"r": -4}, "r must be a positive integer"),
    ({"r": None}, "r must be a positive integer"),
    ({"lora_alpha": float("nan")}, "lora_alpha must be a positive finite number"),
    ({"lora_alpha": float("inf")}, "lora_alpha must be a positive finite number"),
    ({"lora_alpha": -1}, "lora_alpha must be a positive finite number"),
    ({"lora_alpha": 0}, "lora_alpha must be a positive finite number"),
    ({"lora_alpha": "16"}, "lora_alpha must be a positive finite number"),
    ({"lora_alpha": False}, "lora_alpha must be a positive finite number"),
    ({"lora_alpha": [16]}, "lora_alpha must be a positive finite number"),
    ({"rank_pattern": ["q_proj", 4]}, "rank_pattern must be an object"),
    ({"rank_pattern": "q_proj"}, "rank_pattern must be an object"),
    ({"alpha_pattern": 3}, "alpha_pattern must be an object"),
    ({"rank_pattern": {"q_proj": 2.5}}, "rank_pattern['q_proj'] must be a positive integer"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj'] must be a positive integer"),
    ({"rank_pattern": {"q_proj": None}}, "rank_pattern['q_proj'] must be a positive integer"),
    ({"alpha_pattern": {"q_proj": float("nan")}}, "alpha_pattern['q_proj'] must be a positive finite"),
    ({"alpha_pattern": {"q_proj": True}}, "alpha_pattern['q_proj'] must be a positive finite"),
    ({"rank_pattern": {"a(?i)b": 2}}, "not a valid regular expression"),  # global flag mid-pattern
    ({"rank_pattern": {"(?i)q_proj": 2}}, "not a valid regular expression"),  # mid-pattern inside PEFT's regex
    ({"alpha_pattern": {"(": 2}}, "not a valid regular expression"),
    ({"rank_pattern": {"q_proj\\": 2}}, "not a valid regular expression"),
    ({"rank_pattern": {"(" * 2000 + ")" * 2000: 2}}, "not a valid regular expression"),  # too deeply nested
    ({"alpha_pattern": {"[" * 50_000: 2}}, "longer than 10000 characters"),  # would take seconds to compile
    ({"target_modules": "model.(q|"}, "target_modules"),
    ({"exclude_modules": "["}, "exclude_modules"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_FIELDS, ids=[str(f)[:40] for f, _ in BAD_FIELDS])
def test_bad_fields_are_one_line_errors(tmp_path: Path, fields: dict[str, Any], message: str) -> None:
    assert message in one_line_error(write(tmp_path, json.dumps({**GOOD, **fields})))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "the JSON is a list, not an object"),
        ('"LORA"', "the JSON is a str"),
        ("null", "the JSON is a NoneType"),
        ("{not json", "not a readable PEFT adapter config"),
        ("", "not a readable PEFT adapter config"),
        ("[" * 100_000 + "]" * 100_000, "not a readable"),  # RecursionError inside json
        ('{"peft_type": "LORA", "r": 1' + "0" * 5000 + "}", "not a readable"),  # int too long to convert
        (b"\xff\xfe{}", "not a readable"),
        ('{"peft_type": "IA3"}', "type IA3 is not supported"),
        ('{"peft_type": ["LORA"]}', "is not supported"),
        ('{"r": 4}', "unknown (no peft_type)"),
        ('{"peft_type": "\\u001b[31mLORA"}', r"\x1b"),  # control characters escaped in the message
    ],
)
def test_bad_files_are_one_line_errors(tmp_path: Path, text: str | bytes, message: str) -> None:
    assert message in one_line_error(write(tmp_path, text))


def test_missing_fifo_and_folder_configs(tmp_path: Path) -> None:
    assert "missing, or not a regular file" in one_line_error(tmp_path)
    (tmp_path / "adapter_config.json").mkdir()
    assert "not a regular file" in one_line_error(tmp_path)
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "adapter_config.json")  # opening it would block forever
    assert "not a regular file" in one_line_error(fifo)


def test_no_assert_in_peft() -> None:
    """`assert` vanishes under python -O: nothing in spectra/peft may rely on it."""
    for path in (Path(__file__).resolve().parents[1] / "spectra" / "peft").glob("*.py"):
        assert not any(isinstance(node, ast.Assert) for node in ast.walk(ast.parse(path.read_text()))), path.name


@pytest.mark.slow  # a child process importing torch: a few seconds
def test_malformed_config_under_python_O(tmp_path: Path) -> None:
    """No assert guards user input: under -O a bad config still raises CheckpointError."""
    for i, text in enumerate(["[1]", json.dumps({**GOOD, "r": float("inf")}), json.dumps({**GOOD, "r": "x"})]):
        write(tmp_path / str(i), text)
    code = (
        "import sys; from pathlib import Path; from spectra import CheckpointError; "
        "from spectra.peft.read import read_lora_settings\n"
        "for f in sys.argv[1:]:\n"
        "    try: read_lora_settings(Path(f))\n"
        "    except CheckpointError: print('ok')\n"
    )
    args = [str(tmp_path / str(i)) for i in range(3)]
    out = subprocess.run([sys.executable, "-O", "-c", code, *args], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["ok"] * 3, out.stderr


def test_peft_type_case_and_lora_settings_direct(tmp_path: Path) -> None:
    """LoraSettings still builds from its fields alone (raw defaults to {})."""
    direct = LoraSettings(
        r=4,
        lora_alpha=8.0,
        use_rslora=True,
        fan_in_fan_out=False,
        rank_pattern={"q_proj": 16},
        alpha_pattern={},
        variant=None,
        modules_to_save=(),
        target_parameters=(),
    )
    assert direct.raw == {} and direct.scale("model.layers.0.q_proj") == 8.0 / 4.0
    assert direct.rank_and_alpha("model.xq_proj") == (4, 8.0)


# ---------------------------------------------------------------- fuzzing

FIELDS = ("peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "fan_in_fan_out")
FIELDS += ("target_modules", "exclude_modules", "modules_to_save", "target_parameters", "use_dora", "task_type")
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["LORA", "lora", "IA3", "q_proj", "all-linear", "(", "a(?i)b", ".*", "[", "\\", "\x1b[2J"]),
    st.text(alphabet="q_proj.(?i)[]{}\\\ud800é\x1b", max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text("q_proj.(", max_size=6), inner, max_size=3),
    max_leaves=6,
)
pattern_keys = st.text(alphabet="q_proj.layers0123()[]{}*+?|\\^$(?i)", max_size=16)
configs = st.fixed_dictionaries(
    {"peft_type": st.sampled_from(["LORA", "LORA", "lora", "IA3"])},
    optional={
        "r": st.one_of(st.integers(min_value=-2, max_value=64), scalars),
        "lora_alpha": st.one_of(st.floats(min_value=-2, max_value=64), scalars),
        "rank_pattern": st.one_of(st.dictionaries(pattern_keys, st.one_of(st.integers(-1, 16), scalars)), values),
        "alpha_pattern": st.one_of(st.dictionaries(pattern_keys, st.one_of(st.floats(-1, 16), scalars)), values),
        **{f: values for f in FIELDS[5:]},
    },
)
# a good config with a few fields replaced: cheaper to draw, closer to real files
edited = st.dictionaries(st.sampled_from(FIELDS), st.one_of(scalars, values), max_size=4).map(lambda d: {**GOOD, **d})


def mutate(text: str, data: st.DataObject) -> str | bytes:
    """Byte-level mutations of a config text: flips, insertions, deletions, truncation, duplication, nesting."""
    raw = bytearray(text.encode("utf-8"))
    for _ in range(data.draw(st.integers(1, 6))):
        kind = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate", "duplicate", "nest", "token"]))
        at = data.draw(st.integers(0, len(raw)))
        if kind == "flip" and raw:
            raw[min(at, len(raw) - 1)] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete":
            del raw[at : at + data.draw(st.integers(1, 8))]
        elif kind == "truncate":
            del raw[at:]
        elif kind == "duplicate":
            raw[at:at] = raw[at : at + data.draw(st.integers(1, 32))]
        elif kind == "nest":
            depth = data.draw(st.sampled_from([10, 1000, 50_000]))
            raw[at:at] = b"[" * depth + b"1" + b"]" * depth
        else:
            token = data.draw(st.sampled_from([b"NaN", b"-Infinity", b"1e999", b"true", b'"(?i)"', b"{}", b"9" * 40]))
            raw[at:at] = token
    return bytes(raw)


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder)


def check(folder: Path, text: str | bytes) -> None:
    """read_lora_settings returns working settings or raises CheckpointError, quickly."""
    write(folder, text)
    start = time.perf_counter()
    try:
        got = read_lora_settings(folder)
    except CheckpointError as exc:
        assert "\n" not in str(exc)
    else:
        for module in MODULES:
            r, alpha = got.rank_and_alpha(module)
            assert r >= 1 and alpha > 0 and got.scale(module) > 0
    assert time.perf_counter() - start < 1.0


def fuzz(n: int) -> settings:
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)


@fuzz(700)
@given(config=st.one_of(edited, configs))
def test_fuzz_structured_configs(scratch: Path, config: dict[str, Any]) -> None:
    check(scratch, json.dumps(config, allow_nan=True))


@fuzz(1300)
@given(data=st.data())
def test_fuzz_mutated_configs(scratch: Path, data: st.DataObject) -> None:
    check(scratch, mutate(json.dumps(GOOD, indent=data.draw(st.sampled_from([None, 2]))), data))


@pytest.mark.slow
@fuzz(20_000)
@given(data=st.data())
def test_fuzz_long(scratch: Path, data: st.DataObject) -> None:
    if data.draw(st.booleans()):
        check(scratch, json.dumps(data.draw(st.one_of(edited, configs)), allow_nan=True))
    else:
        check(scratch, mutate(json.dumps(GOOD), data))
