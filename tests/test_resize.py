"""`spectra resize`: a PEFT LoRA adapter → new ranks from its factors, checked against float64 numpy and PEFT.

A PEFT-written r = 64 adapter holding a planted rank-8 update, resized to r = 8, reproduces ΔW to 1e-6 relative;
resized to r = 4 it has the predicted error √(1 − E(4)) (numpy SVD of the float64 product) and PEFT's merge
agrees. The user's config is kept (only ranks and alphas change, each module's scale too); rsLoRA, embeddings,
lora_bias, rank 0 modules; DoRA, IA³, LoKr and modules_to_save are refused with the reason, nothing written.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import spectra
from spectra import CheckpointError, MismatchError, Options, RankRule
from spectra.peft.read import read_lora_settings
from spectra_cli.app import app

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

CPU = Options(device="cpu")
LLAMA = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 2}
LLAMA |= {"num_key_value_heads": 2, "vocab_size": 70}
TARGETS = ["q_proj", "v_proj", "down_proj"]
runner = CliRunner()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("base")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def biased(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same shapes with a bias on every linear layer (PEFT's lora_bias merges only onto those)."""
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("biased")
    config = transformers.LlamaConfig(**LLAMA, attention_bias=True, mlp_bias=True)
    transformers.LlamaForCausalLM(config).save_pretrained(str(folder))
    return folder


def model(base: Path) -> Any:
    return transformers.LlamaForCausalLM.from_pretrained(str(base))


def planted_adapter(base: Path, folder: Path, rank: int = 8, seed: int = 0, **config: Any) -> Path:
    """A PEFT-saved adapter whose every module's B·A has rank exactly `rank` (B = G·H, H of `rank` rows); no copy
    of the embedding weights is saved (resize refuses adapters holding one: see the refusal test)."""
    settings = {"r": 64, "lora_alpha": 128, "target_modules": TARGETS, "lora_dropout": 0.05} | config
    wrapped = peft.get_peft_model(model(base), peft.LoraConfig(**settings))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name and name.endswith("weight"):
                param.copy_(
                    torch.randn(param.shape[0], rank, generator=g) @ torch.randn(rank, param.shape[1], generator=g)
                )
            elif "lora_A" in name or "lora_embedding" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
            elif "lora_B" in name and name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=g))
    wrapped.save_pretrained(str(folder), save_embedding_layers=False)
    return folder


def deltas(folder: Path) -> dict[str, np.ndarray]:
    """module -> ΔW = scale·B@A in float64 (as PEFT's layer computes it, before any transpose), from the files."""
    settings = read_lora_settings(folder)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if ".lora_A." in key or key.endswith("lora_embedding_A"):
            module = key.removeprefix("base_model.model.").split(".lora_")[0]
            b = tensors[key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")]
            out[module] = settings.scale(module) * (b.double().numpy() @ a.double().numpy())
    return out


def merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    state = peft.PeftModel.from_pretrained(model(base), str(adapter)).merge_and_unload().state_dict()
    return {k: v.detach() for k, v in state.items()}


def test_planted_rank_8_comes_back_exactly_at_r_8(base: Path, tmp_path: Path) -> None:
    adapter = planted_adapter(base, tmp_path / "r64")
    result = spectra.resize(adapter, tmp_path / "r8", RankRule(rank=8), CPU, base=base)
    assert {m.rank for m in result.modules} == {8} and len(result.modules) == 2 * len(TARGETS)
    old, new = deltas(adapter), deltas(tmp_path / "r8")
    assert old.keys() == new.keys()
    for module, delta in old.items():
        assert np.linalg.norm(new[module] - delta) / np.linalg.norm(delta) < 1e-6, module
    assert all(m.error < 1e-6 and m.relative_change is not None for m in result.modules)
    before, after = merged(base, adapter), merged(base, tmp_path / "r8")
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=1e-5, atol=1e-5)


def test_r_4_gives_the_predicted_error(base: Path, tmp_path: Path) -> None:
    """√(1 − E(4)) from numpy's float64 SVD of scale·B@A; PEFT's merge shows the same error against the r = 64 one."""
    adapter = planted_adapter(base, tmp_path / "r64", seed=1)
    result = spectra.resize(adapter, tmp_path / "r4", RankRule(rank=4), CPU, base=base)
    old = deltas(adapter)
    before, after = merged(base, adapter), merged(base, tmp_path / "r4")
    for m in result.modules:
        s = np.linalg.svd(old[m.name.removesuffix(".weight")], compute_uv=False)
        assert m.error == pytest.approx(math.sqrt(np.sum(s[4:] ** 2) / np.sum(s**2)), rel=1e-6)
        got = torch.linalg.norm(after[m.name].double() - before[m.name].double()) / np.linalg.norm(s)
        assert float(got) == pytest.approx(m.error, rel=0.01)


def test_the_users_config_is_kept_and_each_scale(base: Path, tmp_path: Path) -> None:
    adapter = planted_adapter(base, tmp_path / "r64", rank=12, task_type="CAUSAL_LM")
    result = spectra.resize(adapter, tmp_path / "out", RankRule(energy=0.9), CPU)
    old = json.loads((adapter / "adapter_config.json").read_text())
    new = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    changed = {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
    assert changed <= {"r", "lora_alpha", "rank_pattern", "alpha_pattern"}
    assert (
        new["lora_dropout"] == 0.05
        and new["task_type"] == "CAUSAL_LM"
        and new["target_modules"] == old["target_modules"]
    )
    settings = read_lora_settings(tmp_path / "out")
    for m in result.modules:
        assert settings.rank_and_alpha(m.name.removesuffix(".weight"))[0] == m.rank <= 12
        assert settings.scale(m.name.removesuffix(".weight")) == pytest.approx(2.0)  # α/r = 128/64 kept
        assert m.captured >= 0.9 * (1 - 1e-6)


def test_rslora_scale_is_kept(base: Path, tmp_path: Path) -> None:
    adapter = planted_adapter(base, tmp_path / "r64", use_rslora=True, lora_alpha=16)
    spectra.resize(adapter, tmp_path / "out", RankRule(rank=5), CPU)
    settings = read_lora_settings(tmp_path / "out")
    assert settings.use_rslora and settings.scale("model.layers.0.self_attn.q_proj") == pytest.approx(16 / 8)
    old, new = deltas(adapter), deltas(tmp_path / "out")
    for module, delta in old.items():  # rank 5 of a rank-8 product: the best rank-5 approximation
        s = np.linalg.svd(delta, compute_uv=False)
        assert np.linalg.norm(new[module] - delta) == pytest.approx(math.sqrt(np.sum(s[5:] ** 2)), rel=1e-5)


def test_embeddings_lora_bias_and_budget(base: Path, biased: Path, tmp_path: Path) -> None:
    """lora_embedding_A/B are resized in their own orientation; lora_B biases are carried; a budget drops modules."""
    adapter = planted_adapter(base, tmp_path / "r64", target_modules=["embed_tokens", "q_proj"], r=32, lora_alpha=32)
    result = spectra.resize(adapter, tmp_path / "emb", RankRule(rank=3), CPU)
    assert "model.embed_tokens.weight" in {m.name for m in result.modules}
    before, after = merged(base, adapter), merged(base, tmp_path / "emb")
    for m in result.modules:
        got = torch.linalg.norm(after[m.name].double() - before[m.name].double())
        want = np.linalg.norm(deltas(adapter)[m.name.removesuffix(".weight")])
        assert float(got / want) == pytest.approx(m.error, rel=0.01)
    adapter = planted_adapter(biased, tmp_path / "bias", target_modules=["q_proj", "down_proj"], lora_bias=True, r=16)
    result = spectra.resize(adapter, tmp_path / "b", RankRule(budget=2 * (64 + 64)), CPU)
    kept = {m.name for m in result.modules}
    assert 0 < len(kept) < 4 and all(m.bias for m in result.modules)
    assert {s.reason for s in result.left_out} == {"rank-0", "not-representable"}
    config = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert config["lora_bias"] is True and config["exclude_modules"]
    before, after = merged(biased, adapter), merged(biased, tmp_path / "b")
    for name in kept:
        bias = name.removesuffix(".weight") + ".bias"
        torch.testing.assert_close(after[bias], before[bias], rtol=1e-6, atol=1e-6)


def cli(*args: object) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def test_non_lora_adapters_are_refused_with_the_reason(base: Path, tmp_path: Path) -> None:
    made = {
        "DoRA": peft.LoraConfig(r=4, target_modules=TARGETS, use_dora=True),
        "IA³": peft.IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "LoKr": peft.LoKrConfig(r=4, target_modules=TARGETS),
    }
    for what, config in made.items():
        peft.get_peft_model(model(base), config).save_pretrained(str(tmp_path / what))
        result = cli("resize", tmp_path / what, "-o", tmp_path / "out", "--rank", "2")
        assert result.exit_code == 1 and what in result.output and result.output.count("\n") == 1, result.output
        assert "Traceback" not in result.output and not (tmp_path / "out").exists()
    saved = peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    peft.get_peft_model(model(base), saved).save_pretrained(str(tmp_path / "mts"))
    with pytest.raises(CheckpointError, match="modules_to_save"):
        spectra.resize(tmp_path / "mts", tmp_path / "out", RankRule(rank=2), CPU)
    embedding = peft.LoraConfig(r=4, target_modules=["embed_tokens"])
    peft.get_peft_model(model(base), embedding).save_pretrained(str(tmp_path / "emb"))  # saves the base embedding too
    with pytest.raises(CheckpointError, match="save_embedding_layers"):
        spectra.resize(tmp_path / "emb", tmp_path / "out", RankRule(rank=2), CPU)
    with pytest.raises(CheckpointError, match="spectra extract"):
        spectra.resize(base, tmp_path / "out", RankRule(rank=2), CPU)
    assert sorted(os.listdir(tmp_path)) == sorted([*made, "mts", "emb"])


def test_untrained_adapter_and_output_checks(base: Path, tmp_path: Path) -> None:
    peft.get_peft_model(model(base), peft.LoraConfig(r=4, target_modules=TARGETS)).save_pretrained(str(tmp_path / "z"))
    with pytest.raises(MismatchError, match="ΔW = 0"):
        spectra.resize(tmp_path / "z", tmp_path / "out", RankRule(rank=2), CPU)
    adapter = planted_adapter(base, tmp_path / "a")
    for out in (adapter, adapter / "inside"):
        result = cli("resize", adapter, "-o", out, "--rank", "2", "--overwrite")
        assert result.exit_code == 1 and "apart from the inputs" in result.output
    result = cli("resize", adapter, "-o", tmp_path / "ok", "--rank", "auto", "--json", "-")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["rule"]["auto"] and all(m["rank"] <= 8 for m in record["modules"])
    assert sorted(os.listdir(tmp_path)) == ["a", "ok", "z"]
