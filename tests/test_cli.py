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


def invoke(*args: str | Path, columns: int = 200):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": str(columns)})


def assert_clean_error(result, code: int, *fragments: str) -> None:  # type: ignore[no-untyped-def]
    """Exit `code`, nothing on stdout, and on stderr one error line (after the line saying what is read)."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("reading ")]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_rank_prints_tables_to_stdout_and_writes_json(planted_pair: PairFactory, tmp_path: Path) -> None:
    base, tuned, _ = planted_pair()
    out = tmp_path / "out" / "analysis.json"
    result = invoke("rank", base, tuned, "--json", out)
    assert result.exit_code == 0, result.output
    assert "rank@0.9" in result.stdout and "mlp.rank8" in result.stdout
    assert "names: model.layers.<layer>.<module>.weight" in result.stdout  # the elided prefix, said once
    assert "4 matrices: median rank@0.9" in result.stdout
    assert "reading" not in result.stderr  # the progress-like first line is for terminals only
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
    "--devices": "local devices, one worker each",
    "--executor": "local | ray",
    "--ray-address": "join this Ray cluster",
    "--base-quantization": "nf4 | fp4 | int8: diff against the base as QLoRA quantised it (bitsandbytes)",
    "--quant-block-size": "absmax block size of --base-quantization nf4/fp4",
    "--double-quant": "--base-quantization nf4/fp4 with double quantisation (QLoRA's)",
    "--verbose": "log decisions (skips, batches, device) to stderr",
}
EVERY_FLAG = (
    *("--threshold", "0.5", "--device", "cpu", "--precision", "exact", "--include", "rank8|step"),
    *("--exclude", "step", "--lora-ranks", "4,8", "--batch-bytes", "4096", "--threads", "1", "--download", "-v"),
    *("--devices", "cpu", "--executor", "local"),
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
    devices=("cpu",),
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
        assert shown and all(float(a) == pytest.approx(config["lora_alpha"], rel=1e-3) for a in shown), (
            shown,
            config["lora_alpha"],
        )
        assert f"the per-module variant (r = {config['r']}," in text


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


# ---------------------------------------------------------------- the recommendation a user acts on

CONFIGS = {
    "bert": ({"architectures": ["BertModel"], "model_type": "bert"}, "FEATURE_EXTRACTION"),
    "llama": ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "CAUSAL_LM"),
    "t5": ({"architectures": ["T5ForConditionalGeneration"], "model_type": "t5"}, "SEQ_2_SEQ_LM"),
    "bert-mlm": ({"architectures": ["BertForMaskedLM"], "model_type": "bert"}, None),
}


@pytest.mark.parametrize("family", list(CONFIGS))
def test_task_type_comes_from_the_base_config(planted_pair: PairFactory, tmp_path: Path, family: str) -> None:
    base, tuned, _ = planted_pair()
    config, expected = CONFIGS[family]
    (base.parent / "config.json").write_text(json.dumps({**config, "_name_or_path": f"org/{family}-base"}))
    saved = tmp_path / "a.json"
    assert invoke("rank", base, tuned, "--json", saved).exit_code == 0
    analysis = json.loads(saved.read_text())
    assert analysis["base_info"]["model"]["task_type"] == expected  # recorded in the analysis
    assert analysis["recommendation"]["config"]["task_type"] == expected
    result = invoke("recommend", saved, "-o", tmp_path / "adapter")
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["task_type"] == expected and written["base_model_name_or_path"] == f"org/{family}-base"
    assert f"task_type {expected}" in " ".join(result.stdout.split())
    override = invoke("recommend", saved, "--task-type", "SEQ_CLS", "-o", tmp_path / "x.json")
    assert override.exit_code == 0 and json.loads((tmp_path / "x.json").read_text())["task_type"] == "SEQ_CLS"


def test_no_config_means_no_task_type(planted_pair: PairFactory, tmp_path: Path) -> None:
    base, tuned, _ = planted_pair()
    saved = tmp_path / "a.json"
    assert invoke("rank", base, tuned, "--json", saved).exit_code == 0
    assert invoke("recommend", saved, "-o", tmp_path / "c.json").exit_code == 0
    assert json.loads((tmp_path / "c.json").read_text())["task_type"] is None


def test_variant_chooses_what_is_written(planted_pair: PairFactory, tmp_path: Path) -> None:
    base, tuned, _ = planted_pair()
    saved = tmp_path / "a.json"
    assert invoke("rank", base, tuned, "--json", saved).exit_code == 0
    per_module = invoke("recommend", saved, "-o", tmp_path / "p.json")
    uniform = invoke("recommend", saved, "--variant", "uniform", "-o", tmp_path / "u.json")
    assert per_module.exit_code == uniform.exit_code == 0
    p, u = (json.loads((tmp_path / f).read_text()) for f in ("p.json", "u.json"))
    rec = json.loads(saved.read_text())["recommendation"]
    assert u["r"] == rec["uniform_rank"] and u["lora_alpha"] == 2 * u["r"] and not u["rank_pattern"]
    assert p == rec["config"] and p["rank_pattern"]  # the per-module allocation, as saved with the analysis
    text = " ".join(per_module.stdout.split())
    assert f"wrote {tmp_path / 'p.json'}: the per-module variant (r = {p['r']}," in text
    assert f"--variant uniform: r = {rec['uniform_rank']} on every target module" in text
    assert "the uniform variant (r = " in " ".join(uniform.stdout.split())
    assert "(the per-module variant" in per_module.stderr  # the stderr line says which, too
    assert_clean_error(invoke("recommend", saved, "--variant", "both"), 2, "variant must be one of")


@pytest.mark.slow  # builds and saves three tiny transformers models
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_peft_loads_the_written_config_on_bert_llama_and_t5(tmp_path: Path) -> None:
    """The written config, task type inferred, wraps the base with get_peft_model (CAUSAL_LM on BERT would fail)."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    tiny = {
        "bert": (transformers.BertModel, transformers.BertConfig(hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=64, vocab_size=64)),
        "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=64, vocab_size=64)),
        "t5": (transformers.T5ForConditionalGeneration, transformers.T5Config(d_model=32, d_ff=64, d_kv=8,
               num_layers=2, num_heads=4, vocab_size=64)),
    }  # fmt: skip
    for family, (cls, config) in tiny.items():
        torch.manual_seed(0)
        model = cls(config)
        model.save_pretrained(tmp_path / family / "base")
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p += 0.01 * torch.randn(p.shape[0], 2) @ torch.randn(2, p.shape[1])
        model.save_pretrained(tmp_path / family / "tuned")
        saved, out = tmp_path / family / "a.json", tmp_path / family / "adapter"
        assert invoke("rank", tmp_path / family / "base", tmp_path / family / "tuned", "--json", saved).exit_code == 0
        assert invoke("recommend", saved, "-o", out).exit_code == 0
        lora = peft.LoraConfig.from_pretrained(str(out))
        assert str(lora.task_type) == CONFIGS[family][1] or lora.task_type == CONFIGS[family][1]
        wrapped = peft.get_peft_model(cls.from_pretrained(tmp_path / family / "base"), lora)
        assert sum("lora_A" in n for n, _ in wrapped.named_parameters()) > 0, family


# ---------------------------------------------------------------- the terminal


def llama_pair(tmp_path: Path, layers: int = 2, evil: str | None = None) -> tuple[Path, Path]:
    """A tiny pair with Llama's key names (long ones, an embedding and lm_head outside the blocks)."""
    torch.manual_seed(0)
    shapes = {"self_attn.q_proj": (48, 40), "self_attn.v_proj": (24, 40), "mlp.down_proj": (40, 56)}
    base = {"model.embed_tokens.weight": torch.randn(32, 40), "lm_head.weight": torch.randn(32, 40)}
    for i in range(layers):
        base |= {f"model.layers.{i}.{path}.weight": torch.randn(*shape) for path, shape in shapes.items()}
        base[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(40)
    if evil is not None:
        base[evil] = torch.randn(8, 8)
    tuned = {k: v + (0.1 * torch.randn_like(v) if v.dim() == 2 else 0) for k, v in base.items()}
    return save_checkpoint(base, tmp_path / "base"), save_checkpoint(tuned, tmp_path / "tuned")


NUMBER = re.compile(r"\d+(?:\.\d+)?%?\*?")


def table_lines(text: str) -> list[list[str]]:
    """Rows of the tables in `text`: the lines between a rule (──) and the next blank or prose line."""
    rows, inside = [], False
    for line in text.splitlines():
        if set(line.strip()) == {"─"}:
            inside = True
            continue
        if inside and (not line.strip() or not re.match(r"^\s*\S+(\s{2,}\S+)+\s*$", line)):
            inside = False
        if inside:
            rows.append(line.split())
    return rows


@pytest.mark.parametrize("columns", [80, 200])
def test_rank_fits_the_terminal_width(tmp_path: Path, columns: int) -> None:
    base, tuned = llama_pair(tmp_path)
    result = invoke("rank", base, tuned, columns=columns)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    rules = [line for line in lines if set(line.strip()) == {"─"}]
    assert rules and all(len(line) <= columns for line in rules)
    rows = table_lines(result.stdout)
    assert rows and all(len("  ".join(r)) <= columns for r in rows)
    matrix_rows = [r for r in rows if r[0].isdigit() and len(r) > 2 and "proj" in r[1]]
    assert len(matrix_rows) == 6  # one line per matrix: no name broken over lines
    modules = {r[1] for r in matrix_rows}
    assert modules == {"self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"} or modules == {
        "q_proj",
        "v_proj",
        "down_proj",
    }
    for r in matrix_rows:
        assert all(NUMBER.fullmatch(cell) or "×" in cell for cell in r[2:]), r  # whole numbers, none cut
    header = next(line for line in lines if line.lstrip().startswith("layer") and "rank@0.9" in line)
    assert "E(8)" in header and len(header) <= columns
    if columns == 200:
        assert "stable" in header and "effective" in header
    assert "names: model.layers.<layer>.<module>.weight" in result.stdout
    assert "model.embed_tokens" in result.stdout and "lm_head" in result.stdout


def test_summary_prints_the_kinds_and_the_recommendation_only(tmp_path: Path) -> None:
    base, tuned = llama_pair(tmp_path)
    quiet = invoke("rank", base, tuned, "-q", columns=80)
    assert quiet.exit_code == 0
    assert "per module kind" in quiet.stdout and "Recommended LoRA" in quiet.stdout
    assert "ΔW per matrix" not in quiet.stdout and "per layer" not in quiet.stdout
    assert "trade-off" not in quiet.stdout and "Advice" not in quiet.stdout
    assert quiet.stdout.count("Caveat") == 1
    reason = next(line for line in quiet.stdout.splitlines() if line.startswith("Recommended LoRA"))
    assert len(reason) > 80 and reason.rstrip().endswith(")."), reason  # piped: one line, not hard-wrapped
    assert invoke("rank", base, tuned, "--summary", columns=80).stdout == quiet.stdout


def test_per_matrix_rows_are_opt_in_for_large_models(tmp_path: Path) -> None:
    base, tuned = llama_pair(tmp_path, layers=14)  # 42 block matrices + 2: over the default of 40
    default = invoke("rank", base, tuned)
    assert "ΔW per matrix" not in default.stdout and "per-matrix rows with --per-matrix" in default.stdout
    assert "ΔW per matrix" in invoke("rank", base, tuned, "--per-matrix").stdout
    small_base, small_tuned = llama_pair(tmp_path / "small")
    assert "ΔW per matrix" not in invoke("rank", small_base, small_tuned, "--no-per-matrix").stdout


def test_json_to_stdout(planted_pair: PairFactory, tmp_path: Path) -> None:
    base, tuned, _ = planted_pair()
    full = invoke("rank", base, tuned, "--json", "-")
    assert full.exit_code == 0 and not (Path.cwd() / "-").exists()
    data = json.loads(full.stdout)  # stdout is the JSON alone
    assert data["format"] == "spectra.analysis/1" and len(data["layers"][0]["singular_values"]) == 40
    compact = invoke("rank", base, tuned, "--summary-json", "-")
    small = json.loads(compact.stdout)
    assert small["format"] == "spectra.summary/1" and "singular_values" not in small["layers"][0]
    assert small["layers"][0]["rank"] == data["layers"][0]["rank"] and small["summary"] == data["summary"]
    assert len(compact.stdout) < len(full.stdout)
    both = invoke("rank", base, tuned, "--summary-json", tmp_path / "s.json", "--json", "-")
    assert json.loads(both.stdout)["format"] == "spectra.analysis/1"
    assert json.loads((tmp_path / "s.json").read_text())["format"] == "spectra.summary/1"
    assert_clean_error(invoke("rank", base, tuned, "--json", "-", "--summary-json", "-"), 2, "both write to stdout")


def test_markdown_tables(tmp_path: Path) -> None:
    base, tuned = llama_pair(tmp_path, evil="model.layers.0.a|b\x1b[31m.weight")
    result = invoke("rank", base, tuned, "--format", "markdown")
    assert result.exit_code == 0, result.output
    blocks = [b.splitlines() for b in result.stdout.split("\n\n") if b.startswith("|")]
    assert len(blocks) == 2  # per kind, per matrix
    assert blocks[0][0].startswith("| module kind | matrices | median rank@0.9 |") and blocks[0][1].startswith(
        "| :--- |"
    )
    for block in blocks:  # every row has the header's cells (escaped pipes are not separators)
        assert len({len(re.split(r"(?<!\\)\|", line)) for line in block}) == 1, block
    assert "`model.layers.0.a\\|b\\x1b[31m.weight`" in result.stdout and "\x1b" not in result.stdout
    assert "(1.00× a random matrix" in result.stdout and "\\n" not in result.stdout
    assert "**Recommended LoRA:**" in result.stdout and result.stdout.count("Caveat") == 1
    assert_clean_error(invoke("rank", base, tuned, "--format", "html"), 2, "--format must be one of")


def test_names_are_printed_safely(tmp_path: Path) -> None:
    evil = "model.layers.0.evil\x1b[2J\nname.weight"
    base, tuned = llama_pair(tmp_path, evil=evil)
    for args in ((), ("--tsv",), ("--format", "markdown")):
        result = invoke("rank", base, tuned, *args)
        assert result.exit_code == 0, result.output
        assert "\x1b" not in result.stdout and "\\x1b[2J\\nname" in result.stdout, args


def test_version_flags() -> None:
    for flag in ("--version", "-V"):
        result = invoke(flag)
        assert result.exit_code == 0 and re.fullmatch(r"spectra \S+\n", result.stdout)


def test_progress_bar_counts_matrices(planted_pair: PairFactory) -> None:
    base, tuned, _ = planted_pair()
    result = runner.invoke(app, ["rank", str(base), str(tuned)], env={"TTY_COMPATIBLE": "1", "COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[0].startswith("reading ")  # on a terminal, what is read comes first
    assert "4/4" in result.stderr and "matrices" in result.stderr
    assert "model.layers." in result.stderr  # the matrix just done
