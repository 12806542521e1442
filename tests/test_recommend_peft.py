"""End to end with PEFT: the written adapter_config.json loads with LoraConfig.from_pretrained, and get_peft_model
gives every targeted module exactly the allocated rank and alpha, and untargeted modules no adapter.

Tiny models with random weights built from configs (no download). Slow: importing transformers takes seconds.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from builders import layer_metrics
from spectra import LayerMetrics, Recommendation
from spectra.analysis.metrics import module_kinds
from spectra.lora.recommend import recommend, write_adapter_config

# runs by default (≈7 s, most of it importing transformers): the proof that PEFT loads our configs belongs in CI
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning")]
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


TINY_BERT = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 100,
    "max_position_embeddings": 16,
}


def planted_metrics(model: Any, seed: int, rank_of: Any) -> list[LayerMetrics]:
    """LayerMetrics for every 2-D weight of `model`: ΔW = U diag(σ) Vᵀ with random U, V and a planted decaying σ
    of rank rank_of(name, shape); s is then taken from numpy's SVD of the dense ΔW."""
    rng = np.random.default_rng(seed)
    weights = {n: tuple(p.shape) for n, p in model.named_parameters() if p.ndim == 2}
    kinds = module_kinds(list(weights))
    layers = []
    for name, (m, n) in weights.items():
        k = min(rank_of(name, (m, n)), m, n)
        u, _ = np.linalg.qr(rng.standard_normal((m, k)))
        v, _ = np.linalg.qr(rng.standard_normal((n, k)))
        delta = (u * (rng.uniform(0.5, 3.0) * 0.8 ** np.arange(k))) @ v.T
        kind, block = kinds[name]
        layers.append(layer_metrics(name, (m, n), np.linalg.svd(delta, compute_uv=False), kind=kind, layer=block))
    return layers


def wrap(model: Any, rec: Recommendation, folder: Path) -> dict[str, tuple[int, float, float]]:
    """Write, reload and apply the config; module name -> (r, lora_alpha, scaling) of every LoRA layer."""
    write_adapter_config(rec, folder)
    loaded = peft.LoraConfig.from_pretrained(str(folder))
    assert loaded.r == rec.config["r"] and loaded.lora_alpha == rec.config["lora_alpha"]
    assert loaded.rank_pattern == rec.config["rank_pattern"] and loaded.alpha_pattern == rec.config["alpha_pattern"]
    assert set(loaded.target_modules) == set(rec.config["target_modules"])
    assert set(loaded.exclude_modules or ()) == set(rec.config.get("exclude_modules", ()))
    assert loaded.use_rslora == rec.config["use_rslora"]
    wrapped = peft.get_peft_model(model, loaded)
    return {
        name: (module.r["default"], module.lora_alpha["default"], module.scaling["default"])
        for name, module in wrapped.base_model.model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }


def check(
    layers: list[LayerMetrics], rec: Recommendation, got: dict[str, tuple[int, float, float]], rslora: bool
) -> None:
    expected = {lm.name.removesuffix(".weight"): rec.allocation.get(lm.name, 0) for lm in layers}
    assert set(got) == {m for m, r in expected.items() if r > 0}  # untargeted and rank-0 modules: no adapter
    for module, (r, alpha, scaling) in got.items():
        assert r == expected[module]
        assert alpha == pytest.approx(2 * math.sqrt(8) if rslora else 2 * r)
        # α/r = 2, or with rsLoRA α fixed at 2√8: scale 2·√(8/r) (2 at r = 8)
        assert scaling == pytest.approx(2.0 * math.sqrt(8 / r) if rslora else 2.0)


def tiny_llama() -> Any:
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    return transformers.LlamaForCausalLM(config)


def test_llama_mixed_ranks(tmp_path: Path) -> None:
    model = tiny_llama()
    layers = planted_metrics(model, 0, lambda name, shape: 3 + (sum(map(ord, name)) % 20))
    rec = recommend(layers, rule="energy")  # the energy rule's greedy allocation gives mixed ranks
    assert rec is not None
    assert "embed_tokens" not in rec.target_modules and "lm_head" not in rec.target_modules
    assert len(set(rec.allocation.values())) > 3 and rec.config["rank_pattern"]
    check(layers, rec, wrap(model, rec, tmp_path / "adapter"), rslora=False)


def test_llama_budget_with_excluded_modules_and_rslora(tmp_path: Path) -> None:
    model = tiny_llama()
    layers = planted_metrics(model, 1, lambda name, shape: 2 + (sum(map(ord, name)) % 7))
    rec = recommend(layers, budget=6000, rslora=True, include_embeddings=True)
    assert rec is not None
    assert 0 in rec.allocation.values() and rec.config["exclude_modules"]
    assert rec.allocation_params <= 6000
    check(layers, rec, wrap(model, rec, tmp_path / "adapter"), rslora=True)


def test_llama_per_kind_keys(tmp_path: Path) -> None:
    model = tiny_llama()
    rank = {"q_proj": 4, "k_proj": 2, "v_proj": 6, "o_proj": 3, "gate_proj": 5, "up_proj": 5, "down_proj": 8}
    layers = planted_metrics(model, 2, lambda name, shape: rank.get(name.split(".")[-2], 1))
    rec = recommend(layers, target=1.0, budget=10**6)  # enough to buy every nonzero direction
    assert rec is not None
    assert {lm.kind: rec.allocation[lm.name] for lm in layers if lm.name in rec.allocation} == rank
    assert set(rec.config["rank_pattern"]) <= set(rank)  # one key per kind, none per module
    check(layers, rec, wrap(model, rec, tmp_path / "adapter"), rslora=False)


def test_bert_ambiguous_kinds(tmp_path: Path) -> None:
    config = transformers.BertConfig(**TINY_BERT)
    model = transformers.BertModel(config)
    layers = planted_metrics(model, 3, lambda name, shape: 1 + (sum(map(ord, name)) % 9))
    assert {"attention.output.dense", "output.dense"} <= {lm.kind for lm in layers}
    rec = recommend(layers, task_type=None)
    assert rec is not None
    assert rec.config["task_type"] is None
    check(layers, rec, wrap(model, rec, tmp_path / "adapter"), rslora=False)


def test_bert_untargeted_kind_inside_a_targeted_suffix(tmp_path: Path) -> None:
    """ "output.dense" targeted, "attention.output.dense" not (all noisy): the entry "output.dense" would wrap both."""
    config = transformers.BertConfig(**TINY_BERT)
    model = transformers.BertModel(config)
    layers = [
        replace(lm, noisy=lm.kind == "attention.output.dense")
        for lm in planted_metrics(model, 4, lambda name, shape: 1 + (sum(map(ord, name)) % 9))
    ]
    rec = recommend(layers, task_type=None)
    assert rec is not None
    assert not any(name.endswith("attention.output.dense.weight") for name in rec.allocation)
    assert any(name.endswith("output.dense.weight") for name in rec.allocation)
    check(layers, rec, wrap(model, rec, tmp_path / "adapter"), rslora=False)


def test_name_matching_mirrors_peft() -> None:
    """recommend's copies of PEFT's matching rules agree with PEFT's own functions on real module names."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    from spectra.peft.layout import list_hits, literal_pattern, pattern_hits

    config = transformers.BertConfig(**TINY_BERT)
    modules = [n for n, _ in transformers.BertModel(config).named_modules() if n]
    suffixes = {".".join(m.split(".")[-k:]) for m in modules for k in (1, 2, 3)}
    for entry in sorted(suffixes | set(modules[:20])):
        lora = peft.LoraConfig(target_modules=[entry])
        assert list_hits(entry, modules) == {m for m in modules if check_target_module_exists(lora, m)}, entry
        key = literal_pattern(entry)
        assert pattern_hits(key, modules) == {m for m in modules if get_pattern_key([key], m) == key}, entry
