"""Quantised bases (QLoRA): bitsandbytes' own round trip, the probe that finds a base's quantisation error in ΔW,
the flag that diffs against the quantised base, and the noise floor they extend.

The oracle of the round trip is bitsandbytes' whole-tensor API; the planted case is a QLoRA-style merge built
with it: tuned = bf16(dequant(quant(W)) + U·Vᵀ) with a rank-8 update of equal singular values. Tests that need
bitsandbytes skip without it (pip install 'spectra-lm[quant]'); the others simulate its absence.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from builders import layer_metrics
from spectra import MismatchError, Options, OptionsError, Spectrum, analyze, load_analysis, save_analysis
from spectra.analysis.metrics import compute_metrics, energy_rank, quantization_notes
from spectra.io.checkpoint import open_checkpoint
from spectra.plan import Dense, plan_pair, quant
from spectra.plan.quant import QuantSpec, probe, probe_rows, quantized_by_qlora, quantized_transposed, round_trip
from spectra.records import QuantProbe
from spectra_cli.app import app

requires_bnb = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes (the quant extra)"
)
LINEAR = tuple(
    f"model.layers.{i}.{m}.weight" for i in range(2) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
)
SHAPE = (128, 256)


def bnb() -> Any:
    return quant.require_bitsandbytes()


def reference(w: torch.Tensor, kind: str, double: bool = True, block: int = 64) -> torch.Tensor:
    """dequant(quant(w)) through bitsandbytes' public whole-tensor API, as Linear4bit / Linear8bitLt do it."""
    functional = bnb()
    if kind == "int8":
        cb, scb, _ = functional.int8_vectorwise_quant(w.to(torch.float16))
        return functional.int8_vectorwise_dequant(cb, scb)  # type: ignore[no-any-return]
    packed, state = functional.quantize_4bit(w, blocksize=block, compress_statistics=double, quant_type=kind)
    return functional.dequantize_4bit(packed, state)  # type: ignore[no-any-return]


def rank8(shape: tuple[int, int], norm: float, g: torch.Generator) -> torch.Tensor:
    """U·Vᵀ with 8 equal singular values and Frobenius norm `norm`, float64 (r@0.9 = 8 exactly)."""
    u, _ = torch.linalg.qr(torch.randn(shape[0], 8, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], 8, generator=g, dtype=torch.float64))
    return u @ v.T * (norm / 8**0.5)


def qlora_pair(
    where: Path,
    kind: str = "nf4",
    *,
    double: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    names: tuple[str, ...] = LINEAR,
    transposed: bool = False,
    seed: int = 0,
) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A bf16 (or `dtype`) base and its QLoRA-style merge: each linear weight dequant(quant(W)) + a rank-8 update of
    2% of ‖W‖ (bitsandbytes' own API, the weight transposed first when `transposed`); embed_tokens and lm_head
    (never quantised) get a small dense update. Returns the two files and the planted updates."""
    g = torch.Generator().manual_seed(seed)
    base, tuned, planted = {}, {}, {}
    for name in names:
        w = (torch.randn(SHAPE, generator=g) * 0.02).to(dtype)
        dq = reference(w.T.contiguous(), kind, double).T if transposed else reference(w, kind, double)
        update = rank8(SHAPE, 0.02 * float(w.double().norm()), g)
        base[name], tuned[name], planted[name] = w, (dq.double() + update).to(dtype), update
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        w = (torch.randn(100, SHAPE[0], generator=g) * 0.02).to(dtype)
        base[name], tuned[name] = w, (w.double() + 1e-3 * torch.randn(w.shape, generator=g)).to(dtype)
    where.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in base.items()}, where / "base.safetensors")
    save_file({k: v.contiguous() for k, v in tuned.items()}, where / "tuned.safetensors")
    return where / "base.safetensors", where / "tuned.safetensors", planted


@pytest.fixture
def no_bitsandbytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """bitsandbytes as if not installed: its import fails and the planner finds no spec for it."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    monkeypatch.setattr(quant, "bitsandbytes_available", lambda: False)


# ---------------------------------------------------------------- the round trip is bitsandbytes' own


@requires_bnb
@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("double", [True, False])
@pytest.mark.parametrize(("shape", "block"), [((48, 200), 64), ((33, 70), 64), ((48, 200), 128)])
def test_four_bit_round_trip_equals_bitsandbytes(
    kind: str, double: bool, shape: tuple[int, int], block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bit for bit, also when quantised in several chunks (block-aligned) and with a partial last block."""
    monkeypatch.setattr(quant, "QUANT_CHUNK", 4096)
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.bfloat16, torch.float32):
        w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
        ours, theirs = round_trip(w, QuantSpec(kind, block, double, False)), reference(w, kind, double, block)
        assert ours.dtype == theirs.dtype == dtype
        assert torch.equal(ours, theirs)
        assert not torch.equal(ours, w)


@requires_bnb
def test_odd_sizes_int8_and_transposed_round_trips() -> None:
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(3, 37, generator=g) * 0.02).bfloat16()  # 111 elements: padded by one zero, codes unchanged
    padded = torch.cat([w.reshape(-1), w.new_zeros(1)]).view(1, -1)
    assert torch.equal(round_trip(w, QuantSpec("nf4", 64, True, False)).reshape(-1), reference(padded, "nf4")[0, :111])
    w = (torch.randn(40, 64, generator=g) * 0.02).bfloat16()
    int8 = round_trip(w, QuantSpec("int8", 64, True, False))
    assert int8.dtype == torch.float32 and torch.equal(int8, reference(w, "int8"))
    transposed = round_trip(w, QuantSpec("nf4", 64, True, True))
    assert torch.equal(transposed, reference(w.T.contiguous(), "nf4").T)
    assert not torch.equal(transposed, round_trip(w, QuantSpec("nf4", 64, True, False)))


def test_which_weights_a_qlora_run_quantises() -> None:
    for name in (*LINEAR, "transformer.h.0.attn.c_attn.weight", "bert.encoder.layer.0.attention.self.query.weight"):
        assert quantized_by_qlora(name), name
    for name in ("model.embed_tokens.weight", "lm_head.weight", "transformer.wte.weight", "transformer.wpe.weight"):
        assert not quantized_by_qlora(name), name
    for name in ("score.weight", "classifier.weight", "embed_out.weight", "output.weight"):
        assert not quantized_by_qlora(name), name
    assert not quantized_by_qlora("model.layers.0.self_attn.q_proj.bias")
    assert quantized_transposed("transformer.h.3.mlp.c_fc.weight") and not quantized_transposed(LINEAR[0])


@requires_bnb
def test_the_plan_quantises_linear_weights_only_and_pickles(tmp_path: Path) -> None:
    base, tuned, _ = qlora_pair(tmp_path)
    options = Options(base_quantization="fp4", quant_block_size=128, double_quant=False)
    with open_checkpoint(base) as b, open_checkpoint(tuned) as t:
        plan = plan_pair(b, t, options)
        probing = plan_pair(b, t, Options())
    specs = {job.name: job.operand.base_quant for job in plan.jobs if isinstance(job.operand, Dense)}
    assert {n for n, spec in specs.items() if spec is not None} == set(LINEAR)
    assert specs[LINEAR[0]] == QuantSpec("fp4", 128, False, False)
    assert {j.name for j in probing.jobs if isinstance(j.operand, Dense) and j.operand.quant_probe} == set(LINEAR)
    assert pickle.loads(pickle.dumps(plan)) == plan
    (note,) = plan.notes
    assert "fp4 (block size 128, double quantisation off)" in note and "the 2 others" in note


# ---------------------------------------------------------------- the probe


@pytest.mark.parametrize("shape", [(128, 256), (4096, 64), (1000, 100), (777, 130), (5, 3), (256, 4096)])
@pytest.mark.parametrize("transpose", [False, True])
def test_probe_rows_are_block_aligned_and_spread(shape: tuple[int, int], transpose: bool) -> None:
    rows, cols = shape
    ranges = probe_rows(shape, transpose)
    assert ranges and all(0 <= lo < hi <= rows for lo, hi in ranges)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(ranges))  # ordered, disjoint
    sampled = sum(hi - lo for lo, hi in ranges) * cols
    if ranges != [(0, rows)]:
        assert sampled >= quant.PROBE_ELEMENTS // 2 and len(ranges) >= quant.PROBE_SEGMENTS // 2
        for lo, hi in ranges:
            if transpose:
                assert lo % 64 == 0 and (hi - lo) % 64 == 0
            else:
                assert (lo * cols) % 64 == 0 and ((hi - lo) * cols) % 64 == 0


@requires_bnb
@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_probe_measures_the_error_a_merge_carries(kind: str) -> None:
    """Against the float64 value on the whole matrix: coefficient ⟨ΔW, E⟩/‖E‖² and ‖E‖²."""
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(1024, 512, generator=g) * 0.02).bfloat16()
    error = reference(w, kind, double=False).double() - w.double()
    merged = error + rank8(w.shape, 0.02 * float(w.double().norm()), g)
    unrelated = torch.randn(w.shape, generator=g, dtype=torch.float64) * float(error.norm()) / 1024
    ranges = probe_rows(w.shape, False)
    for delta, coefficient in ((merged, 1.0), (unrelated, 0.0)):
        found = probe([w[lo:hi] for lo, hi in ranges], [delta[lo:hi] for lo, hi in ranges], w.numel(), False)
        exact = float(torch.sum(delta * error) / torch.sum(error * error))
        assert abs(exact - coefficient) < 0.01
        if coefficient == 1.0:
            assert found is not None and found.kind == kind
            assert abs(found.coefficient - exact) < 0.05
            assert found.energy == pytest.approx(float(torch.sum(error * error)), rel=0.1)
        else:
            assert found is None or abs(found.coefficient) < 0.05


# ---------------------------------------------------------------- the planted QLoRA merge, end to end


@requires_bnb
def test_merged_qlora_model_is_flagged_with_one_hint(tmp_path: Path) -> None:
    base, tuned, planted = qlora_pair(tmp_path)
    analysis = analyze(base, tuned, Options(precision="exact"))
    layers = {lm.name: lm for lm in analysis.layers}
    for name in planted:
        lm = layers[name]
        assert lm.quantized_base == "nf4" and lm.quant_error_fraction is not None and lm.quant_error_fraction > 0.9
        assert lm.rank > 0.9 * lm.random_rank  # what the user would have been told: spread like noise
        assert lm.noisy and lm.noise_fraction > 0.9  # the 4-bit error joins the floor
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert layers[name].quantized_base is None and layers[name].quant_error_fraction is None
    hints = [n for n in analysis.notes if "--base-quantization nf4" in n]
    assert len(hints) == 1 and "6 of 6 linear matrices" in hints[0]
    saved = json.loads(Path(save_analysis(analysis, tmp_path / "a.json")).read_text())
    row = next(r for r in saved["layers"] if r["name"] == LINEAR[0])
    assert row["quantized_base"] == "nf4" and row["rank"] == layers[LINEAR[0]].rank  # keys added, contract kept
    assert load_analysis(tmp_path / "a.json").layers == analysis.layers


@requires_bnb
@pytest.mark.parametrize(
    ("kind", "dtype", "double"),
    [
        ("nf4", torch.bfloat16, True),
        ("nf4", torch.bfloat16, False),
        ("fp4", torch.bfloat16, True),
        ("nf4", torch.float32, True),
        ("int8", torch.bfloat16, True),
    ],
)
def test_base_quantization_recovers_the_planted_update(
    tmp_path: Path, kind: str, dtype: torch.dtype, double: bool
) -> None:
    """rank@0.9 is the planted 8 and ‖ΔW‖² = ‖U·Vᵀ‖² within the storage floor (exactly, from an fp32 base)."""
    base, tuned, planted = qlora_pair(tmp_path, kind, double=double, dtype=dtype)
    options = Options(precision="exact", base_quantization=kind, double_quant=double)
    analysis = analyze(base, tuned, options)
    layers = {lm.name: lm for lm in analysis.layers}
    for name, update in planted.items():
        lm, energy = layers[name], float(update.norm()) ** 2
        assert lm.rank == 8 and lm.quantized_base is None
        assert abs(lm.frobenius_norm**2 / energy - 1) <= 2 * lm.noise_fraction + 1e-6
        if dtype == torch.bfloat16:
            assert 1e-3 < lm.noise_fraction < 0.02  # the tuned side's bf16 rounding only: the base is computed
        else:
            assert lm.noise_fraction == 0.0
    assert layers["lm_head.weight"].rank > 8  # not quantised: diffed as stored
    assert any("for the 6 linear weights a QLoRA run quantises; the 2 others" in n for n in analysis.notes)
    assert not any("still carry" in n for n in analysis.notes)


@requires_bnb
def test_the_wrong_quantization_is_named(tmp_path: Path) -> None:
    base, tuned, _ = qlora_pair(tmp_path, "fp4")
    analysis = analyze(base, tuned, Options(base_quantization="nf4"))
    assert {lm.quantized_base for lm in analysis.layers if lm.name in LINEAR} == {"fp4"}
    (note,) = [n for n in analysis.notes if "still carry" in n]
    assert "after diffing against nf4" in note and "--base-quantization fp4" in note


@requires_bnb
def test_conv1d_weights_are_quantised_transposed(tmp_path: Path) -> None:
    names = ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight")
    base, tuned, _ = qlora_pair(tmp_path, names=names, transposed=True)
    flagged = analyze(base, tuned)
    assert {lm.quantized_base for lm in flagged.layers if lm.name in names} == {"nf4"}
    fixed = analyze(base, tuned, Options(base_quantization="nf4"))
    assert {lm.rank for lm in fixed.layers if lm.name in names} == {8}


@requires_bnb
def test_cli_prints_the_hint_and_takes_the_flag(tmp_path: Path) -> None:
    base, tuned, _ = qlora_pair(tmp_path)
    runner = CliRunner()
    plain = runner.invoke(app, ["rank", str(base), str(tuned)], env={"COLUMNS": "400"})
    assert plain.exit_code == 0, plain.output
    assert plain.stdout.count("rerun with --base-quantization nf4") == 1
    fixed = runner.invoke(app, ["rank", str(base), str(tuned), "--base-quantization", "nf4", "--tsv"])
    assert fixed.exit_code == 0, fixed.output
    rows = [line.split("\t") for line in fixed.stdout.strip().splitlines()]
    ranks = {r[0]: int(r[rows[0].index("rank")]) for r in rows[1:]}
    assert all(ranks[name] == 8 for name in LINEAR)


# ---------------------------------------------------------------- bad input


def test_options_are_validated() -> None:
    for bad in ({"base_quantization": "nf5"}, {"quant_block_size": 48}, {"quant_block_size": True}):
        with pytest.raises(OptionsError):
            Options(**bad)  # type: ignore[arg-type]
    options = Options(base_quantization="int8", quant_block_size=4096, double_quant=False)
    assert options.quant_block_size == 4096 and Options().quant_block_size == 64 and Options().double_quant


def test_the_flag_without_bitsandbytes_is_one_line(planted_pair: Any, no_bitsandbytes: None, tmp_path: Path) -> None:
    base, tuned, _ = planted_pair()
    with pytest.raises(OptionsError, match=r"pip install 'spectra-lm\[quant\]'"):
        analyze(base, tuned, Options(base_quantization="nf4"))
    result = CliRunner().invoke(app, ["rank", str(base), str(tuned), "--base-quantization", "nf4"])
    assert result.exit_code == 2 and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "bitsandbytes" in lines[0]
    assert "Traceback" not in result.output
    bad = CliRunner().invoke(app, ["rank", str(base), str(tuned), "--base-quantization", "q3"])
    assert bad.exit_code == 2 and "base_quantization must be one of nf4, fp4, int8" in bad.stderr


def test_an_fp32_pair_without_the_flag_is_unaffected(planted_pair: Any) -> None:
    """No quantised base: nothing flagged, no hint (the probe finds no quantisation error in an ordinary ΔW)."""
    base, tuned, _ = planted_pair()
    analysis = analyze(base, tuned, Options(precision="exact"))
    assert all(lm.quantized_base is None for lm in analysis.layers)
    assert not any("quantis" in n for n in analysis.notes)
    assert {lm.name: lm.rank for lm in analysis.layers}["model.layers.0.mlp.rank8.weight"] == 8
    with pytest.raises(MismatchError):  # the flag changes ΔW, not the checks: unequal files still fail alike
        analyze(base, base, Options())


@requires_bnb
def test_without_bitsandbytes_the_energy_check_hints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, tuned, _ = qlora_pair(tmp_path)  # built with bitsandbytes, analysed as if it were missing
    monkeypatch.setattr(quant, "bitsandbytes_available", lambda: False)
    analysis = analyze(base, tuned)
    assert all(lm.quant_error_fraction is None for lm in analysis.layers)
    (note,) = [n for n in analysis.notes if "quantisation error" in n]
    assert "6 of 6 linear matrices" in note and "spectra-lm[quant]" in note and "--base-quantization nf4" in note


# ---------------------------------------------------------------- metrics: the flag and the noise floor (numpy)


def probed(coefficient: float, error_share: float, noise_share: float = 0.001) -> Any:
    """LayerMetrics of a ΔW of energy 1 whose probe found `coefficient` and ‖E‖² = error_share."""
    s = np.full(50, 50**-0.5)
    found = QuantProbe("nf4", coefficient, error_share)
    spectrum = Spectrum("model.layers.0.q_proj.weight", (50, 60), s, 1.0, 10.0, "bf16", noise_share, "x", found)
    return compute_metrics(spectrum, Options(), "q_proj", 0)


def test_a_probe_flags_and_extends_the_noise_floor() -> None:
    carried = probed(1.0, 0.8)
    assert carried.quantized_base == "nf4" and carried.quant_error_fraction == pytest.approx(0.8)
    assert carried.noise_fraction == pytest.approx(0.801) and carried.noisy
    small = probed(1.0, 0.05)  # the error is there but cannot move rank@0.9
    assert small.quantized_base is None and small.noise_fraction == pytest.approx(0.001) and not small.noisy
    unrelated = probed(0.01, 50.0)  # a large base error the fine-tune does not carry
    assert unrelated.quantized_base is None and unrelated.quant_error_fraction == pytest.approx(0.005)
    for coefficient in (0.3, 1.8, -1.0):
        assert probed(coefficient, 0.9).quantized_base is None
    plain = layer_metrics("model.layers.0.self_attn.q_proj.weight", (50, 60), np.ones(50))
    assert plain.quant_error_fraction is None and plain.quantized_base is None


def test_the_energy_check_needs_most_linear_matrices_alike() -> None:
    def layer(name: str, values: np.ndarray, relative: float) -> Any:
        energy = float(np.sum(values**2))
        return layer_metrics(name, (64, 64), values, base_norm=energy**0.5 / relative)

    noise = np.random.default_rng(0).standard_normal((64, 64))
    spread = np.linalg.svd(noise, compute_uv=False)
    like = [layer(f"model.layers.{i}.self_attn.q_proj.weight", spread, 0.09) for i in range(4)]
    low_rank = [layer(f"model.layers.{i}.mlp.up_proj.weight", spread[:4], 0.09) for i in range(4)]
    small = [layer(f"model.layers.{i}.mlp.down_proj.weight", spread, 0.01) for i in range(4)]
    (note,) = quantization_notes(like + low_rank[:3], Options())
    assert "4 of 7 linear matrices" in note
    assert quantization_notes(like + low_rank + small, Options()) == ()
    assert quantization_notes(like, Options(base_quantization="nf4")) == ()


# ---------------------------------------------------------------- a real QLoRA run (transformers + PEFT + bitsandbytes)


@requires_bnb
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_peft_qlora_run_merged_16bit(tmp_path: Path) -> None:
    """A tiny Llama loaded in NF4 (double quantisation, bf16 compute) on the CPU, a LoRA trained on all linear layers
    for 10 AdamW steps, merged as "merged_16bit" exports are (each layer's dequantised weight + its LoRA ΔW, bf16):
    without the flag every linear matrix is flagged; with it rank@0.9 and ‖ΔW‖ are those of the LoRA's own ΔW."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    config.vocab_size = 100
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    bnb_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=bnb_config, dtype=torch.bfloat16, device_map="cpu"
    )
    model = peft.get_peft_model(
        peft.prepare_model_for_kbit_training(model), peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    tokens = torch.randint(0, 100, (4, 16))
    for _ in range(10):
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    functional = bnb()
    base_sd = load_file(tmp_path / "base" / "model.safetensors")
    merged, lora = dict(base_sd), {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear4bit):
            weight = module.base_layer.weight
            key = name.removeprefix("base_model.model.") + ".weight"
            lora[key] = module.get_delta_weight("default").detach().double()
            merged[key] = (functional.dequantize_4bit(weight.data, weight.quant_state) + lora[key]).bfloat16()
    save_file({k: v.contiguous() for k, v in merged.items()}, tmp_path / "merged.safetensors")
    assert len(lora) == 14
    flagged = analyze(tmp_path / "base" / "model.safetensors", tmp_path / "merged.safetensors")
    assert {lm.name for lm in flagged.layers if lm.quantized_base == "nf4"} == set(lora)
    assert any("--base-quantization nf4" in n for n in flagged.notes)
    options = Options(precision="exact", base_quantization="nf4")
    for lm in analyze(tmp_path / "base" / "model.safetensors", tmp_path / "merged.safetensors", options).layers:
        s = torch.linalg.svdvals(lora[lm.name]).numpy()
        assert abs(lm.rank - energy_rank(s, 0.9)) <= 1
        assert lm.frobenius_norm == pytest.approx(float(np.linalg.norm(s)), rel=max(lm.noise_fraction, 1e-3))


def test_a_lora_adapter_ignores_the_flag_and_says_so(tmp_path: Path) -> None:
    """ΔW = scale·B@A whatever the base: the factors are analysed as always, with a note (no bitsandbytes needed)."""
    g = torch.Generator().manual_seed(8)
    module = "model.layers.0.self_attn.q_proj"
    save_file({f"{module}.weight": torch.randn(48, 40, generator=g)}, tmp_path / "base.safetensors")
    (tmp_path / "adapter").mkdir()
    factors = {"lora_A.weight": torch.randn(4, 40, generator=g), "lora_B.weight": torch.randn(48, 4, generator=g)}
    save_file(
        {f"base_model.model.{module}.{k}": v for k, v in factors.items()},
        tmp_path / "adapter/adapter_model.safetensors",
    )
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    (tmp_path / "adapter/adapter_config.json").write_text(json.dumps(config))
    analysis = analyze(tmp_path / "base.safetensors", tmp_path / "adapter", Options(base_quantization="nf4"))
    assert [lm.rank for lm in analysis.layers] == [energy_rank(analysis.layers[0].s, 0.9)]
    assert analysis.layers[0].method == "factored-f64"
    assert any(n.startswith("--base-quantization has no effect on a LoRA adapter") for n in analysis.notes)
