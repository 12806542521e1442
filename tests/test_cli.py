"""The command line: exit codes, stdout vs stderr, one-line errors without tracebacks, no partial output files."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path
from typing import Annotated

import pytest
import torch
import typer
from typer.testing import CliRunner

from conftest import PairFactory, save_checkpoint
from spectra import Options
from spectra_cli.app import app
from spectra_cli.flags import OPTIONS_FLAGS, options_flags

runner = CliRunner()


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_error(result, code: int, *fragments: str) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_rank_prints_tables_to_stdout_and_writes_json(planted_pair: PairFactory, tmp_path: Path) -> None:
    base, tuned, _ = planted_pair()
    out = tmp_path / "out" / "analysis.json"
    result = invoke("rank", base, tuned, "--json", out)
    assert result.exit_code == 0, result.output
    assert "rank@0.9" in result.stdout and "layers.0.mlp.rank8" in result.stdout
    assert "4 matrices: median rank@0.9" in result.stdout
    assert f"wrote {out}" in result.stderr
    data = json.loads(out.read_text())
    assert data["format"] == "spectra.analysis/1" and len(data["layers"]) == 4


def test_tsv_output_is_machine_readable(planted_pair: PairFactory) -> None:
    base, tuned, spectra = planted_pair()
    result = invoke("rank", base, tuned, "--tsv", "--threshold", "0.5", "--lora-ranks", "4,8")
    assert result.exit_code == 0
    rows = [line.split("\t") for line in result.stdout.strip().splitlines()]
    assert rows[0][:4] == ["name", "rows", "cols", "rank"] and rows[0][-2:] == ["captured_4", "captured_8"]
    assert [r[0] for r in rows[1:]] == list(spectra)
    assert rows[1][3] == "4"  # rank8 at threshold 0.5


def test_include_exclude_flags(planted_pair: PairFactory) -> None:
    base, tuned, _ = planted_pair()
    result = invoke("rank", base, tuned, "--tsv", "--include", "rank8|step", "--exclude", "step")
    assert result.exit_code == 0
    assert len(result.stdout.strip().splitlines()) == 2


def test_missing_file(tmp_path: Path) -> None:
    out = tmp_path / "a.json"
    assert_clean_error(invoke("rank", tmp_path / "nope", tmp_path / "nope2", "--json", out), 1, "nope", "no such file")
    assert not out.exists()


def test_not_safetensors(planted_pair: PairFactory, tmp_path: Path) -> None:
    base, _, _ = planted_pair()
    bad = tmp_path / "notes.safetensors"
    bad.write_text("not a checkpoint")
    assert_clean_error(invoke("rank", base, bad), 1, str(bad), "not a safetensors file")


def test_truncated_checkpoint(planted_pair: PairFactory, tmp_path: Path) -> None:
    base, tuned, _ = planted_pair()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tuned.read_bytes()[:-500])
    out = tmp_path / "a.json"
    assert_clean_error(invoke("rank", base, cut, "--json", out), 1, str(cut), "truncated")
    assert not out.exists() and not list(tmp_path.glob(".a.json*"))


def test_pickle_bin_is_refused(planted_pair: PairFactory, tmp_path: Path) -> None:
    base, _, _ = planted_pair()
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    assert_clean_error(invoke("rank", base, tmp_path / "pytorch_model.bin"), 1, "pickle", "safetensors")


@pytest.mark.parametrize(
    ("side", "value"),
    [("tuned", float("nan")), ("tuned", float("inf")), ("base", float("nan")), ("base", float("-inf"))],
)
@pytest.mark.parametrize("precision", ["fast", "exact"])
def test_non_finite_weights_name_the_file_and_tensor(tmp_path: Path, side: str, value: float, precision: str) -> None:
    """A NaN/Inf weight (a diverged fine-tune) has no spectrum: one line naming file and tensor, no JSON written."""
    torch.manual_seed(0)
    w = {"a.weight": torch.randn(40, 30), "b.weight": torch.randn(30, 50)}
    tuned = {k: v + 1e-2 * torch.randn_like(v) for k, v in w.items()}
    (tuned if side == "tuned" else w)["b.weight"][7, 3] = value
    base_path, tuned_path = save_checkpoint(w, tmp_path / "b"), save_checkpoint(tuned, tmp_path / "t")
    out = tmp_path / "a.json"
    result = invoke("rank", base_path, tuned_path, "--json", out, "--precision", precision)
    bad = base_path if side == "base" else tuned_path
    assert_clean_error(result, 1, str(bad), f"{side} tensor 'b.weight'", "NaN/Inf", "--exclude")
    assert not out.exists()


def test_no_matching_tensors(tmp_path: Path) -> None:
    base = save_checkpoint({"a.weight": torch.randn(3, 3)}, tmp_path / "b")
    tuned = save_checkpoint({"b.weight": torch.randn(3, 3)}, tmp_path / "t")
    assert_clean_error(invoke("rank", base, tuned), 1, "no tensor names in common")


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1", "nan"])
def test_bad_threshold_is_a_usage_error(planted_pair: PairFactory, tmp_path: Path, value: str) -> None:
    base, tuned, _ = planted_pair()
    out = tmp_path / "a.json"
    assert_clean_error(invoke("rank", base, tuned, "--threshold", value, "--json", out), 2, "threshold")
    assert not out.exists()


@pytest.mark.parametrize(
    ("flag", "value"), [("--device", "tpu"), ("--precision", "sloppy"), ("--lora-ranks", "8,x"), ("--include", "([")]
)
def test_bad_settings_are_usage_errors(planted_pair: PairFactory, flag: str, value: str) -> None:
    base, tuned, _ = planted_pair()
    assert_clean_error(invoke("rank", base, tuned, flag, value), 2, flag.removeprefix("--").split("-")[0])


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.startswith("spectra ")


def test_report_and_recommend_from_a_saved_analysis(planted_pair: PairFactory, tmp_path: Path) -> None:
    base, tuned, _ = planted_pair()
    saved = tmp_path / "a.json"
    assert invoke("rank", base, tuned, "--json", saved).exit_code == 0
    result = invoke("report", saved, "-o", tmp_path / "r.html")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.html").read_text().lstrip().lower().startswith("<!doctype html")
    result = invoke("recommend", saved, "-o", tmp_path / "adapter")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] >= 1
    assert "trade-off" in result.stdout and "not derived from the spectrum" in result.stdout


def test_report_of_a_missing_or_foreign_json(tmp_path: Path) -> None:
    assert_clean_error(invoke("report", tmp_path / "none.json"), 1, "none.json", "no such file")
    (tmp_path / "other.json").write_text('{"hello": 1}')
    out = tmp_path / "r.html"
    assert_clean_error(invoke("report", tmp_path / "other.json", "-o", out), 1, "not a spectra analysis")
    assert not out.exists()


# ---------------------------------------------------------------- shared flags, help, defects


SHARED_FLAGS = {
    "--threshold": "share of ‖ΔW‖_F² the rank must explain",
    "--device": "auto | cpu | cuda",
    "--precision": "fast (Gram + eigvalsh) | exact (float64 SVD)",
    "--include": "analyse only tensors whose name matches this regex",
    "--exclude": "skip tensors whose name matches this regex",
    "--lora-ranks": "LoRA ranks for captured energy",
    "--batch-bytes": "bytes of ΔW stacked per batch",
    "--threads": "cap on CPU threads",
    "--download": "let huggingface_hub fetch a hub id missing from the cache",
    "--base-quantization": "nf4 | fp4 | int8: diff against the base as QLoRA quantised it (bitsandbytes)",
    "--quant-block-size": "absmax block size of --base-quantization nf4/fp4",
    "--double-quant": "--base-quantization nf4/fp4 with double quantisation (QLoRA's)",
    "--verbose": "log decisions (skips, batches, device) to stderr",
}
EVERY_FLAG = (
    *("--threshold", "0.5", "--device", "cpu", "--precision", "exact", "--include", "rank8|step"),
    *("--exclude", "step", "--lora-ranks", "4,8", "--batch-bytes", "4096", "--threads", "1", "--download", "-v"),
)
EVERY_OPTION = Options(
    threshold=0.5,
    lora_ranks=(4, 8),
    device="cpu",
    precision="exact",
    include="rank8|step",
    exclude="step",
    batch_bytes=4096,
    threads=1,
    download=True,
)


def help_text(*args: str) -> str:
    result = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return " ".join(result.stdout.replace("│", " ").split())


def test_every_options_field_has_one_shared_flag() -> None:
    assert set(OPTIONS_FLAGS) == {f.name for f in fields(Options)}
    assert {f"--{name.replace('_', '-')}" for name in OPTIONS_FLAGS} | {"--verbose"} == set(SHARED_FLAGS)


def test_rank_help_lists_the_shared_flags_with_their_help() -> None:
    text = help_text("rank")
    for flag, description in SHARED_FLAGS.items():
        assert flag in text and description in text, flag
    assert "[default: 8,16,64,256]" in text and "[default: 0.9]" in text  # defaults come from Options()


def test_rank_takes_every_shared_flag(planted_pair: PairFactory) -> None:
    base, tuned, _ = planted_pair()
    result = invoke("rank", base, tuned, "--tsv", *EVERY_FLAG)
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in result.stdout.strip().splitlines()]
    assert rows[0][-2:] == ["captured_4", "captured_8"] and [r[0] for r in rows[1:]] == [
        "model.layers.0.mlp.rank8.weight"
    ]
    assert rows[1][3] == "4"  # rank8 at threshold 0.5


def test_shared_flags_serve_any_command() -> None:
    """A second command declares none of the flags and receives the same validated Options."""
    other = typer.Typer()
    seen: list[tuple[str, Options]] = []

    @other.command()
    @options_flags
    def extract(base: str, out: Annotated[str, typer.Option("-o")] = "x", *, options: Options) -> None:
        seen.append((out, options))

    result = runner.invoke(other, ["b", "-o", "dir", *EVERY_FLAG])
    assert result.exit_code == 0, result.output
    assert seen == [("dir", EVERY_OPTION)]
    assert runner.invoke(other, ["b"]).exit_code == 0 and seen[-1] == ("x", Options())
    bad = runner.invoke(other, ["b", "--lora-ranks", "8,x"])
    assert_clean_error(bad, 2, "--lora-ranks takes comma-separated integers")
    assert len(seen) == 2  # the command did not run


def test_short_help_option() -> None:
    for args in ((), ("rank",), ("recommend",), ("demo",)):
        assert help_text(*args) == " ".join(
            runner.invoke(app, [*args, "-h"], env={"COLUMNS": "200"}).stdout.replace("│", " ").split()
        )
    assert "rank [OPTIONS]" in help_text("rank")


def test_help_shows_the_revision_syntax() -> None:
    """rich markup would eat `[@revision]` unless escaped."""
    assert "org/name[@revision]" in help_text("rank")


def test_recommend_display_reads_alpha_from_the_written_config(planted_pair: PairFactory, tmp_path: Path) -> None:
    base, tuned, _ = planted_pair()
    saved = tmp_path / "a.json"
    assert invoke("rank", base, tuned, "--json", saved).exit_code == 0
    for flags in (["--rslora"], [], ["--rslora", "--budget", "500"]):
        result = invoke("recommend", saved, "-o", tmp_path / "adapter", *flags)
        assert result.exit_code == 0, result.output
        config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        text = " ".join(result.stdout.split())  # rich wraps long lines
        shown = re.findall(r"lora_alpha = ([0-9.]+)", text)
        assert shown and all(float(a) == config["lora_alpha"] for a in shown), (shown, config["lora_alpha"])
        assert f"config r = {config['r']}," in text


def test_recommend_settings_are_validated_once_by_the_library(planted_pair: PairFactory, tmp_path: Path) -> None:
    base, tuned, _ = planted_pair()
    saved = tmp_path / "a.json"
    assert invoke("rank", base, tuned, "--json", saved).exit_code == 0
    out = tmp_path / "cfg.json"
    for flag, value, message in (
        ("--target", "1.5", "target must be in (0, 1]"),
        ("--max-rank", "0", "max_rank must be at least 1"),
        ("--budget", "0", "budget must be a positive number"),
        ("--task-type", "causal", "task_type must be one of"),
    ):
        assert_clean_error(invoke("recommend", saved, flag, value, "-o", out), 2, message)
        assert not out.exists()
    result = invoke("recommend", saved, "--task-type", "none", "-o", out)
    assert result.exit_code == 0 and json.loads(out.read_text())["task_type"] is None


def test_demo_flags_are_validated_by_the_demo() -> None:
    assert_clean_error(invoke("demo", "--threads", "0"), 2, "threads must be at least 1")
    assert_clean_error(invoke("demo", "--steps", "0"), 2, "steps must be at least 1")
