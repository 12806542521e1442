"""DoRA adapters: ΔW = m ⊙ (W + s·B@A)/‖W + s·B@A‖ − W formed densely from the base, against PEFT's own merge.

Adapters are written by PEFT (tiny Llama / GPT-2 from configs, lora_B and the magnitude randomised before saving);
the oracle is merge_and_unload() minus the base, float64 SVD. A float64 numpy formula checks bf16 storage, and
planted cases (m equal to the norms: ΔW = s·B@A; B = 0: ΔW = (m/‖W‖ − 1) ⊙ W) have answers known in advance.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from spectra import CheckpointError, MismatchError, Options, analyze
from spectra.analysis.metrics import energy_rank
from spectra.io.checkpoint import open_checkpoint
from spectra.io.tensors import Handles
from spectra.plan import quant
from spectra.plan.adapter import plan_adapter
from spectra.plan.delta import make_delta
from spectra.plan.jobs import Dora
from spectra.records import Delta
from spectra_cli.app import app

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
}
PREFIX = "base_model.model."


def randomise(model: Any, seed: int) -> None:
    """lora_A/B random (PEFT's B is zero), the magnitude off ‖W‖ by ~10% (PEFT initialises m = ‖W‖)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "lora_magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))


def write_dora(model: Any, folder: Path, config: Any) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """Base checkpoint, PEFT-written DoRA adapter, and PEFT's merged ΔW per base key (float64)."""
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "model.safetensors"))
    wrapped = peft.get_peft_model(copy.deepcopy(model), config)
    randomise(wrapped, 1)
    wrapped.save_pretrained(str(folder / "adapter"))
    merged = wrapped.merge_and_unload().state_dict()
    deltas = {k: (merged[k].double() - sd[k].double()).numpy() for k in sd if not torch.equal(merged[k], sd[k])}
    return folder / "model.safetensors", folder / "adapter", deltas


@pytest.fixture(scope="module")
def llama_dora(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, np.ndarray]]:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)
    return write_dora(model, tmp_path_factory.mktemp("llama-dora"), config)


def assert_matches_merge(base: Path, adapter: Path, merged: dict[str, np.ndarray], precision: str) -> None:
    analysis = analyze(base, adapter, Options(precision=precision))
    assert {lm.name for lm in analysis.layers} == set(merged)
    for lm in analysis.layers:
        ref = np.linalg.svd(merged[lm.name], compute_uv=False)
        assert lm.shape == merged[lm.name].shape and len(lm.s) == min(lm.shape)  # dense: every σ
        np.testing.assert_allclose(lm.s, ref, rtol=1e-5, atol=1e-5 * ref[0])
        assert lm.rank == energy_rank(ref, 0.9) and lm.noise_fraction == 0.0
        assert lm.frobenius_norm == pytest.approx(float(np.linalg.norm(merged[lm.name])), rel=1e-6)
    (note,) = analysis.notes
    assert note.startswith("DoRA adapter") and "formed densely" in note


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_llama_dora_equals_peft_merge(llama_dora: tuple[Path, Path, dict[str, np.ndarray]], precision: str) -> None:
    assert_matches_merge(*llama_dora, precision)


def test_conv1d_dora_equals_peft_merge(tmp_path: Path) -> None:
    """GPT-2 stores Conv1D weights (in, out): the norm runs over each output feature, a column of the stored W."""
    torch.manual_seed(0)
    gpt2 = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=100, n_positions=16)
    model = transformers.GPT2LMHeadModel(gpt2)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], use_dora=True, fan_in_fan_out=True)
    base, adapter, merged = write_dora(model, tmp_path, config)
    assert {k: v.shape for k, v in merged.items()} == {
        "transformer.h.0.attn.c_attn.weight": (64, 192),
        "transformer.h.0.mlp.c_fc.weight": (64, 256),
    }
    assert_matches_merge(base, adapter, merged, "exact")


def formula(w: np.ndarray, a: np.ndarray, b: np.ndarray, m: np.ndarray, scale: float) -> np.ndarray:
    """DoRA's merged ΔW in float64 numpy, (out, in) weight: rows scaled by m / ‖row of W + s·B@A‖."""
    v = w + scale * b @ a
    return (m / np.linalg.norm(v, axis=1))[:, None] * v - w


def dora_folder(tmp_path: Path, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: torch.Tensor) -> Path:
    """A hand-written one-module DoRA adapter (PEFT's key layout and config) and its base."""
    module = "model.layers.0.self_attn.q_proj"
    save_file({f"{module}.weight": w}, str(tmp_path / "base.safetensors"))
    (tmp_path / "adapter").mkdir()
    tensors = {f"{PREFIX}{module}.lora_A.weight": a, f"{PREFIX}{module}.lora_B.weight": b}
    save_file(
        {**tensors, f"{PREFIX}{module}.lora_magnitude_vector": m}, str(tmp_path / "adapter/adapter_model.safetensors")
    )
    config = '{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_dora": true}'
    (tmp_path / "adapter" / "adapter_config.json").write_text(config)
    return tmp_path


def delta_of(folder: Path, options: Options | None = None) -> torch.Tensor:
    with open_checkpoint(folder / "adapter") as adapter, open_checkpoint(folder / "base.safetensors") as base:
        (job,) = plan_adapter(adapter, base, options or Options()).jobs
        assert isinstance(job.operand, Dora)
        delta = make_delta(job, Handles(), wide=True)
    assert isinstance(delta, Delta) and delta.values is not None and delta.values.dtype == torch.float64
    return delta.values


def test_bf16_storage_against_a_float64_formula(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(48, 40, generator=g) * 0.02).bfloat16()
    a, b = torch.randn(4, 40, generator=g).bfloat16(), (torch.randn(48, 4, generator=g) * 0.01).bfloat16()
    m = (w.double().norm(dim=1) * (1 + 0.1 * torch.randn(48, generator=g, dtype=torch.float64))).bfloat16()
    ours = delta_of(dora_folder(tmp_path, w, a, b, m)).numpy()
    ref = formula(*(t.double().numpy() for t in (w, a, b, m)), scale=8 / 4)
    assert np.max(np.abs(ours - ref)) <= 1e-12 * np.abs(ref).max()


def test_planted_doras(tmp_path: Path) -> None:
    """m = ‖W + s·B@A‖ per row: ΔW = s·B@A (rank 4); B = 0 and m = 3‖W‖: ΔW = 2·W."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(48, 40, generator=g, dtype=torch.float64)
    a, b = torch.randn(4, 40, generator=g, dtype=torch.float64), torch.randn(48, 4, generator=g, dtype=torch.float64)
    m = torch.linalg.vector_norm(w + 2.0 * b @ a, dim=1)
    (tmp_path / "one").mkdir()
    delta = delta_of(dora_folder(tmp_path / "one", w, a, b, m))
    torch.testing.assert_close(delta, 2.0 * b @ a, rtol=0, atol=1e-12)
    (tmp_path / "two").mkdir()
    delta = delta_of(dora_folder(tmp_path / "two", w, a, torch.zeros_like(b), 3 * w.norm(dim=1)))
    torch.testing.assert_close(delta, 2.0 * w, rtol=0, atol=1e-12)


def test_bad_dora_modules_are_refused_with_reasons(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(6)
    w, a, b = torch.randn(48, 40, generator=g), torch.randn(4, 40, generator=g), torch.randn(48, 4, generator=g)
    folder = dora_folder(tmp_path, w, a, b, torch.ones(40))  # one value per input feature: the wrong length
    with pytest.raises(MismatchError, match=r"shape-mismatch: lora_magnitude_vector \(40,\)"):
        analyze(folder / "base.safetensors", folder / "adapter")
    zero = torch.zeros_like(w)
    zero[1:] = w[1:]
    save_file({"model.layers.0.self_attn.q_proj.weight": zero}, str(folder / "base.safetensors"))
    tensors = load_file(str(folder / "adapter/adapter_model.safetensors"))
    tensors[f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(48, 4)
    tensors[f"{PREFIX}model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(48)
    save_file(tensors, str(folder / "adapter/adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="DoRA's norm is 0"):
        analyze(folder / "base.safetensors", folder / "adapter")


def test_without_base_one_line_exit_1(llama_dora: tuple[Path, Path, dict[str, np.ndarray]]) -> None:
    _, adapter, _ = llama_dora
    result = CliRunner().invoke(app, ["rank", str(adapter)])
    assert result.exit_code == 1 and result.stdout == "" and "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "DoRA adapter" in lines[0] and "pass the base model as BASE" in lines[0]


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes (the quant extra)")
def test_qdora_forms_delta_against_the_quantised_base(tmp_path: Path) -> None:
    """QDoRA (DoRA trained on a 4-bit base): W is dequant(quant(W)) in the norm and in the difference."""
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(64, 128, generator=g) * 0.02).bfloat16()
    a, b = torch.randn(4, 128, generator=g), torch.randn(64, 4, generator=g) * 0.01
    m = w.double().norm(dim=1).float() * 1.05
    ours = delta_of(dora_folder(tmp_path, w, a, b, m), Options(base_quantization="nf4")).numpy()
    dq = quant.round_trip(w, quant.QuantSpec("nf4", 64, True, False)).double().numpy()
    ref = formula(dq, a.double().numpy(), b.double().numpy(), m.double().numpy(), 2.0)
    assert np.max(np.abs(ours - ref)) <= 1e-12 * np.abs(ref).max()
