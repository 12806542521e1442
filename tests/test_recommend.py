"""recommend: uniform trade-off, budget allocation and PEFT config on planted spectra with hand-worked answers."""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builders import layer_metrics
from spectra import LayerMetrics, OptionsError, RecommendSettings, SpectraError, recommend, write_adapter_config
from spectra.analysis.baselines import max_lora_rank
from spectra.lora.allocate import allocate_ranks, uniform_tradeoff
from spectra.lora.recommend import RSLORA_ADVICE, TASK_TYPES
from spectra.names import CAVEAT
from spectra.peft.config import EXCLUDE_NOTE, LEGACY_NOTE

Spectrum = Sequence[float] | np.ndarray  # planted singular values, any order


def make_layer(
    name: str, shape: tuple[int, int], values: Spectrum, kind: str | None = None, noisy: bool = False
) -> LayerMetrics:
    """LayerMetrics of a planted spectrum (the builder sorts it)."""
    return layer_metrics(name, shape, values, kind=kind, noisy=noisy)


def block(i: int, kind: str, shape: tuple[int, int], s: Spectrum, noisy: bool = False) -> LayerMetrics:
    sub = "self_attn" if kind.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
    return make_layer(f"model.layers.{i}.{sub}.{kind}.weight", shape, s, kind, noisy)


def peft_rank(config: dict[str, Any], module: str, legacy: bool = False) -> tuple[int, float] | None:
    """(r, alpha) PEFT 0.21 gives `module`: exclude_modules, target_modules list, first matching pattern key.

    `legacy`: PEFT 0.13-0.14, whose pattern key regex was `.*\\.{key}$` (copied from their get_pattern_key)."""

    def listed(entries: Sequence[str]) -> bool:
        return module in entries or any(module.endswith(f".{e}") for e in entries)

    if listed(config.get("exclude_modules") or []) or not listed(config["target_modules"]):
        return None

    def first(pattern: dict[str, Any]) -> str | None:
        return next((k for k in pattern if re.match(rf".*\.{k}$" if legacy else rf"(.*\.)?({k})$", module)), None)

    r_key, a_key = first(config["rank_pattern"]), first(config["alpha_pattern"])
    return (
        config["rank_pattern"][r_key] if r_key else config["r"],
        config["alpha_pattern"][a_key] if a_key else config["lora_alpha"],
    )


# ---------------------------------------------------------------- uniform trade-off


def test_uniform_tradeoff_hand_worked() -> None:
    a = make_layer("a.weight", (8, 6), [3, 2, 1])  # energy 14, m+n 14, m·n 48
    b = make_layer("b.weight", (10, 4), [2, 2])  # energy 8, m+n 14, m·n 40; short s: the rest is zero
    rows = uniform_tradeoff([a, b])
    assert [o.r for o in rows] == [1, 2]  # stops at break-even: b's 3·14 = 42 ≥ 40 parameters is not a LoRA
    assert [o.captured for o in rows] == pytest.approx([13 / 22, 21 / 22])
    assert [o.params for o in rows] == [28, 56]
    assert [o.params_fraction for o in rows] == pytest.approx([28 / 88, 56 / 88])
    assert all(o.params_fraction < 1 for o in uniform_tradeoff([make_layer("c.weight", (384, 1536), np.ones(384))]))


def test_uniform_tradeoff_candidates() -> None:
    a = make_layer("a.weight", (48, 64), np.ones(48))
    assert [o.r for o in uniform_tradeoff([a])] == [1, 2, 4, 8, 16, 27]  # 27·112 < 3072 ≤ 28·112: break-even
    assert [o.r for o in uniform_tradeoff([a], max_side=8)] == [1, 2, 4, 8]
    assert [o.r for o in uniform_tradeoff([a], max_side=100)][-1] == 27
    assert uniform_tradeoff([a])[-1].captured == pytest.approx(27 / 48)
    assert uniform_tradeoff([]) == ()


# ---------------------------------------------------------------- allocation


def test_allocation_hand_worked() -> None:
    # merits σ²/(m+n): A (cost 8): 2, .5, .125; B (cost 16): 4, 1, .5. Order B1 A1 B2 A2 B3 A3.
    # Break-even caps A (3×5: 2·8 ≥ 15) at rank 1 and B (10×6: 4·16 ≥ 60) at 3.
    a = make_layer("a.weight", (3, 5), [4, 2, 1])
    b = make_layer("b.weight", (10, 6), [8, 4, math.sqrt(8)])
    assert allocate_ranks([a, b], 40) == {"a.weight": 1, "b.weight": 2}  # 16+8+16 = 40, energy 96 (optimal)
    assert allocate_ranks([a, b], 30) == {"a.weight": 1, "b.weight": 1}  # B2 (to 40) does not fit
    assert allocate_ranks([a, b], 32) == {"a.weight": 1, "b.weight": 1}  # A2 would fit but costs A's dense 15
    assert allocate_ranks([a, b], 15) == {"a.weight": 1, "b.weight": 0}  # B1 (16) does not fit, A1 (8) does
    assert allocate_ranks([a, b], 0) == {"a.weight": 0, "b.weight": 0}
    assert allocate_ranks([a, b], 10**6) == {"a.weight": 1, "b.weight": 3}  # never at or beyond break-even
    wide = make_layer("c.weight", (30, 50), [4, 2, 1])  # break-even 18.75: the cap does not bind
    assert allocate_ranks([wide], 10**6) == {"c.weight": 3}  # never beyond the spectrum


def test_allocation_beats_uniform_where_pure_greedy_would_not() -> None:
    # A: cost 30, σ² = 33 each (merit 1.1); B: cost 40, σ² = 40 (merit 1). Budget 70 = uniform rank 1:
    # greedy takes A1, A2 (66) and nothing else fits; uniform rank 1 captures 33 + 40 = 73.
    a = make_layer("a.weight", (15, 15), np.full(15, math.sqrt(33)))
    b = make_layer("b.weight", (20, 20), [math.sqrt(40)] + [0.1] * 19)
    assert allocate_ranks([a, b], 70) == {"a.weight": 1, "b.weight": 1}


def test_allocation_short_spectrum_and_bad_budget() -> None:
    a = make_layer("a.weight", (64, 64), [5, 4])  # an adapter's analysis: only 2 nonzero σ
    assert allocate_ranks([a], 10**9) == {"a.weight": 2}
    with pytest.raises(OptionsError):
        allocate_ranks([a], -1)


def _brute_force(layers: Sequence[LayerMetrics], budget: int) -> float:
    """Best Σ captured σ² over every allocation within budget and below break-even (small cases)."""
    cums = [np.concatenate(([0.0], np.cumsum(lm.s**2)))[: max_lora_rank(lm.shape) + 1] for lm in layers]
    costs = [sum(lm.shape) for lm in layers]
    best = 0.0
    for ranks in itertools.product(*[range(len(c)) for c in cums]):
        if sum(r * c for r, c in zip(ranks, costs, strict=True)) <= budget:
            best = max(best, sum(c[r] for c, r in zip(cums, ranks, strict=True)))
    return best


@st.composite
def planted_layers(draw: st.DrawFn) -> list[LayerMetrics]:
    layers = []
    for i in range(draw(st.integers(1, 4))):
        m, n = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        k = draw(st.integers(0, min(m, n)))  # short spectra: the rest is zero
        if draw(st.booleans()):  # flat spectra make the knapsack boundary matter
            s = [draw(st.floats(0.1, 10.0))] * k
        else:
            # σ of zero or ≥ 1e-6: squares of tinier values underflow (a float32 ΔW has none that small)
            s = draw(st.lists(st.just(0.0) | st.floats(1e-6, 10.0), min_size=k, max_size=k))
        layers.append(make_layer(f"l{i}.weight", (m, n), s))
    return layers


@settings(max_examples=200, deadline=None)
@given(planted_layers(), st.integers(0, 60))
def test_allocation_never_below_uniform_and_near_optimal(layers: list[LayerMetrics], budget: int) -> None:
    ranks = allocate_ranks(layers, budget)
    cost = sum(ranks[lm.name] * sum(lm.shape) for lm in layers)
    assert cost <= budget
    captured = sum(float(np.sum(np.sort(lm.s)[::-1][: ranks[lm.name]] ** 2)) for lm in layers)
    unit = sum(sum(lm.shape) for lm in layers)
    assert all(ranks[lm.name] <= max_lora_rank(lm.shape) for lm in layers)  # never a LoRA costing the dense matrix
    for r in range(budget // unit + 1):  # every uniform rank of equal or lower cost, capped at break-even
        uniform = sum(float(np.sum(np.sort(lm.s)[::-1][: min(r, max_lora_rank(lm.shape))] ** 2)) for lm in layers)
        assert captured >= uniform * (1 - 1e-12)
    optimum = _brute_force(layers, budget)
    assert captured <= optimum * (1 + 1e-12) + 1e-12
    largest = max((float(np.max(lm.s)) ** 2 for lm in layers if lm.s.size), default=0.0)
    assert optimum - captured <= largest * (1 + 1e-12) + 1e-12  # within one direction of the optimum


def test_allocation_vectorised_at_7b_scale() -> None:
    rng = np.random.default_rng(0)
    layers = [make_layer(f"l{i}.weight", (512, 1376 if i % 2 else 512), rng.random(512)) for i in range(224)]
    ranks = allocate_ranks(layers, budget=64 * sum(sum(lm.shape) for lm in layers))
    assert sum(ranks[lm.name] * sum(lm.shape) for lm in layers) <= 64 * sum(sum(lm.shape) for lm in layers)


# ---------------------------------------------------------------- recommend


def decaying_model(n_layers: int = 2) -> list[LayerMetrics]:
    """E(8) ≥ 0.9 > E(4) in every matrix: σ_i = 1 for i ≤ 8, then 0.1 for 56 more (energy 8 + 0.56)."""
    s = [1.0] * 8 + [0.1] * 56
    kinds = ("q_proj", "k_proj", "v_proj", "o_proj")
    return [block(i, kind, (64, 64), s) for i in range(n_layers) for kind in kinds]


def test_recommend_uniform_rank() -> None:
    rec = recommend(decaying_model(), rule="energy")
    assert rec is not None
    assert rec.uniform_rank == 8 and not rec.cap_binds
    assert rec.uniform_captured == pytest.approx(8 / 8.56)
    assert rec.budget == 8 * 8 * 128  # uniform r · Σ(m+n)
    assert rec.allocation_params <= rec.budget and rec.allocation_captured >= rec.uniform_captured - 1e-12
    assert set(rec.allocation.values()) == {8}  # identical matrices: the allocation is uniform too
    assert rec.target_modules == ("k_proj", "o_proj", "q_proj", "v_proj")
    assert rec.config["r"] == 8 and rec.config["lora_alpha"] == 16 and rec.config["rank_pattern"] == {}
    assert [o.r for o in rec.tradeoff] == [1, 2, 4, 8, 16, 31]  # 31·128 < 64² ≤ 32·128: break-even
    assert "Uniform rank 8" in rec.reason
    assert rec.caveat == CAVEAT and all("not derived" in a for a in rec.advice)


def test_recommend_cap_binds() -> None:
    flat = [block(i, "q_proj", (64, 64), np.ones(64)) for i in range(2)]
    rec = recommend(flat, max_rank=16, rule="energy")
    assert rec is not None and rec.cap_binds
    assert rec.uniform_rank == 16 and rec.uniform_captured == pytest.approx(16 / 64)
    assert "cap 16" in rec.reason and "needs uniform rank 58" in rec.reason and "LoRA learns less" in rec.reason
    assert rec.not_low_rank == tuple(lm.name for lm in flat)  # 58 ≥ 64·64/128 = 32: not a LoRA
    assert "2 of 2 matrices are not low-rank" in rec.reason and "Fine-tune those modules fully" in rec.reason
    odd = recommend(flat, max_rank=20, rule="energy")  # a cap that is not a power of two is used as given
    assert odd is not None and odd.uniform_rank == 20 and odd.uniform_captured == pytest.approx(20 / 64)
    assert 20 in {o.r for o in odd.tradeoff}
    easy = recommend(flat, max_rank=20, target=0.25, rule="energy")
    assert easy is not None and easy.uniform_rank == 16 and not easy.cap_binds  # exact ties reach the target


def test_recommend_exclusions() -> None:
    layers = [
        *decaying_model(1),
        make_layer("model.embed_tokens.weight", (100, 64), np.ones(64) * 5, "embed_tokens"),
        make_layer("lm_head.weight", (100, 64), np.ones(64) * 5, "lm_head"),
        block(0, "gate_proj", (128, 64), [3.0] * 4, noisy=True),  # all noisy: not targeted
        block(0, "up_proj", (128, 64), [0.01] * 4),  # 0.0004 of ~34: below 1%
        block(0, "down_proj", (64, 128), [0.5] * 8, noisy=True),
        block(1, "down_proj", (64, 128), [0.5] * 8),  # one of two noisy: targeted
    ]
    rec = recommend(layers)
    assert rec is not None
    assert rec.target_modules == ("down_proj", "k_proj", "o_proj", "q_proj", "v_proj")
    assert "embed_tokens (embedding or output head)" in rec.reason and "lm_head" in rec.reason
    assert "gate_proj (at the rounding-noise floor)" in rec.reason and "up_proj (0.0% of the energy)" in rec.reason
    assert set(rec.allocation) == {lm.name for lm in layers if lm.kind in rec.target_modules}
    with_emb = recommend(layers, include_embeddings=True)
    assert with_emb is not None and "embed_tokens" in with_emb.target_modules and "lm_head" in with_emb.target_modules
    assert recommend([]) is None
    assert recommend([block(0, "q_proj", (8, 8), [1.0], noisy=True)]) is None


def test_recommend_budget_and_patterns() -> None:
    # q_proj: 8 strong directions, v_proj: 2 weak ones; the budget buys exactly all of them
    layers = [block(i, "q_proj", (64, 64), [4.0] * 8) for i in range(3)]
    layers += [block(i, "v_proj", (64, 64), [1.0] * 2) for i in range(3)]
    rec = recommend(layers, budget=3 * 128 * 8 + 3 * 128 * 2)
    assert rec is not None
    assert {rec.allocation[lm.name] for lm in layers if lm.kind == "q_proj"} == {8}
    assert {rec.allocation[lm.name] for lm in layers if lm.kind == "v_proj"} == {2}
    assert rec.allocation_captured == pytest.approx(1.0) and rec.allocation_params == rec.budget
    cfg = rec.config
    assert cfg["r"] == 8 and cfg["rank_pattern"] == {"v_proj": 2} and cfg["alpha_pattern"] == {"v_proj": 4}
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and "exclude_modules" not in cfg
    assert "within 3.8k parameters" in rec.reason
    with pytest.raises(OptionsError, match="buys no rank"):
        recommend(layers, budget=100)
    for bad in ({"target": 0.0}, {"target": 1.5}, {"max_rank": 0}, {"budget": 0}):
        with pytest.raises(OptionsError):
            recommend(layers, **bad)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"target": 0.0}, r"target must be in \(0, 1\], got 0.0"),
        ({"target": 1.5}, "target must be in"),
        ({"target": float("nan")}, "target must be in"),
        ({"max_rank": 0}, "max_rank must be at least 1, got 0"),
        ({"budget": 0}, "budget must be a positive number of parameters, got 0"),
        ({"budget": -5}, "budget must be"),
        ({"task_type": "causal"}, "task_type must be one of CAUSAL_LM"),
    ],
)
def test_recommend_settings_are_validated_on_construction(bad: dict[str, Any], message: str) -> None:
    with pytest.raises(OptionsError, match=message):
        RecommendSettings(**bad)
    assert RecommendSettings(task_type=None).task_type is None  # a bare model


def test_recommend_takes_a_settings_record_or_its_fields() -> None:
    layers = decaying_model()
    settings = RecommendSettings(target=0.8, budget=20_000, rslora=True, base_model="org/base", task_type="SEQ_CLS")
    rec = recommend(layers, settings)
    fields = {"target": 0.8, "budget": 20_000, "rslora": True, "base_model": "org/base", "task_type": "SEQ_CLS"}
    assert rec is not None and rec == recommend(layers, **fields)
    assert rec.config["task_type"] == "SEQ_CLS" and rec.config["use_rslora"] and rec.budget == 20_000
    assert recommend(layers, settings, budget=None) == recommend(layers, **{**fields, "budget": None})
    with pytest.raises(OptionsError, match="max_rank"):
        recommend(layers, settings, max_rank=0)  # changes are validated like the record


def test_task_types_are_peft_task_types() -> None:
    peft = pytest.importorskip("peft")
    assert set(TASK_TYPES) == {t.value for t in peft.TaskType}


def test_recommend_mixed_ranks_and_exclusions_resolve_exactly() -> None:
    rng = np.random.default_rng(1)
    layers = [
        block(i, kind, (64, 64), rng.random(64) * (i + 1) * (k + 1))
        for i in range(4)
        for k, kind in enumerate(("q_proj", "k_proj", "v_proj"))
    ]
    layers += [block(i, "v_proj", (64, 64), rng.random(64) * 0.01) for i in (10, 11)]  # rank 0: excluded
    rec = recommend(layers, budget=20 * 128 * 12, rule="energy", rslora=False)  # α = 2r: checked below
    assert rec is not None
    zero = {lm.name for lm in layers if rec.allocation[lm.name] == 0}
    assert {"model.layers.10.self_attn.v_proj.weight", "model.layers.11.self_attn.v_proj.weight"} <= zero
    assert len({rec.allocation[lm.name] for lm in layers}) > 5  # genuinely mixed ranks
    assert rec.config["exclude_modules"] == sorted(n.removesuffix(".weight") for n in zero)
    for lm in layers:  # PEFT's resolution (its regex, literally) gives every module the allocated rank
        r = rec.allocation[lm.name]
        assert peft_rank(rec.config, lm.name.removesuffix(".weight")) == ((r, 2 * r) if r else None)
        assert peft_rank(rec.config, lm.name.removesuffix(".weight"), legacy=True) == ((r, 2 * r) if r else None)
    assert LEGACY_NOTE not in rec.advice and EXCLUDE_NOTE in rec.advice
    assert all(not key.startswith("model.") for key in rec.config["rank_pattern"])  # "layers.3.self_attn.q_proj"
    for key in rec.config["rank_pattern"]:  # each key matches exactly one analysed module, or one kind
        hits = [lm for lm in layers if re.match(rf"(.*\.)?({key})$", lm.name.removesuffix(".weight"))]
        assert len(hits) == 1 or (len({lm.kind for lm in hits}) == 1 and hits[0].kind == key)


def test_recommend_ambiguous_kinds_fall_back_to_module_names() -> None:
    # BERT: "output.dense" is also a suffix of "attention.output.dense", so neither can be a per-kind key.
    layers = []
    for i in range(2):
        layers.append(
            make_layer(
                f"encoder.layer.{i}.attention.output.dense.weight", (32, 32), [2.0] * (2 + i), "attention.output.dense"
            )
        )
        layers.append(make_layer(f"encoder.layer.{i}.output.dense.weight", (32, 64), [1.0] * (4 + i), "output.dense"))
    rec = recommend(layers, target=1.0, budget=10**6)
    assert rec is not None
    assert rec.config["target_modules"] == [
        "attention.output.dense",  # exact: only the attention outputs end with it
        "encoder.layer.0.output.dense",
        "encoder.layer.1.output.dense",
    ]
    for lm in layers:
        r = rec.allocation[lm.name]
        assert r == np.count_nonzero(lm.s)
        assert peft_rank(rec.config, lm.name.removesuffix(".weight")) == (r, 2 * r)


def test_recommend_rslora() -> None:
    layers = [block(0, "q_proj", (64, 64), [1.0] * 16), block(0, "v_proj", (64, 64), [1.0] * 8)]
    rec = recommend(layers, rslora=True, target=1.0, budget=24 * 128)
    assert rec is not None
    cfg = rec.config
    assert cfg["use_rslora"] is True
    resolved = {lm.kind: peft_rank(cfg, lm.name.removesuffix(".weight")) for lm in layers}
    assert resolved["q_proj"] == (16, pytest.approx(2 * math.sqrt(8)))  # α fixed at 2√8, not 2√16
    r_v, alpha_v = resolved["v_proj"]  # type: ignore[misc]
    assert r_v == 8 and alpha_v == pytest.approx(2 * math.sqrt(8)) and alpha_v / math.sqrt(r_v) == pytest.approx(2)
    assert any("rsLoRA" in a for a in rec.advice)


def test_rslora_is_used_above_rank_16_unless_told() -> None:
    """Auto (rslora=None): α = 2r up to r = 16, rsLoRA with α = 2√8 when a rank exceeds 16 (where α = 2r stopped
    training on the measured task); an explicit True/False wins either way."""
    small = [block(0, "q_proj", (64, 64), [1.0] * 16)]
    large = [block(0, "q_proj", (64, 64), [1.0] * 17)]
    for layers, auto in ((small, False), (large, True)):
        for rslora, want in ((None, auto), (True, True), (False, False)):
            rec = recommend(layers, rslora=rslora, target=1.0, budget=len(layers[0].s) * 128)
            assert rec is not None and rec.config["use_rslora"] is want
            r, alpha = peft_rank(rec.config, layers[0].name.removesuffix(".weight"))  # type: ignore[misc]
            assert r == len(layers[0].s) and alpha == pytest.approx(2 * math.sqrt(8) if want else 2 * r)
            assert (RSLORA_ADVICE in rec.advice) is want


# ---------------------------------------------------------------- writing


def test_write_adapter_config(tmp_path: Path) -> None:
    rec = recommend(decaying_model(), base_model="meta-llama/Llama-2-7b-hf")
    assert rec is not None
    written = write_adapter_config(rec, tmp_path / "adapter")
    assert written == tmp_path / "adapter" / "adapter_config.json"
    assert json.loads(written.read_text()) == rec.config
    assert rec.config["base_model_name_or_path"] == "meta-llama/Llama-2-7b-hf"
    as_file = write_adapter_config(rec, tmp_path / "mine.json")
    assert as_file == tmp_path / "mine.json" and json.loads(as_file.read_text()) == rec.config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "mine.json"]  # no temporary left behind
    (tmp_path / "blocker").write_text("a file, not a folder")
    with pytest.raises(SpectraError, match="cannot write"):
        write_adapter_config(rec, tmp_path / "blocker" / "adapter_config.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "blocker", "mine.json"]


def test_recommend_legacy_peft_note() -> None:
    """A single-component module name ("lm_head") in rank_pattern cannot match under PEFT 0.13-0.14's regex."""
    layers = [block(i, "q_proj", (64, 64), [1.0] * 8) for i in range(2)]
    layers.append(make_layer("lm_head.weight", (100, 64), [1.0] * 4, "lm_head"))
    rec = recommend(layers, include_embeddings=True, target=1.0, budget=10**6)
    assert rec is not None and rec.config["rank_pattern"] == {"lm_head": 4}
    assert peft_rank(rec.config, "lm_head") == (4, 8) and peft_rank(rec.config, "lm_head", legacy=True) == (8, 16)
    assert LEGACY_NOTE in rec.advice


# ---------------------------------------------------------------- issue 17: smallest rank, never past break-even


def test_uniform_rank_is_the_smallest_integer_reaching_the_target() -> None:
    # 384×1536 (break-even 307): σ = 1 for 130 directions then 0.05; E(129) < 0.9 ≤ E(130) with a tiny margin.
    s = np.concatenate([np.ones(130), np.full(254, 0.05)])
    e = np.cumsum(s**2) / np.sum(s**2)
    target = float(e[129]) - 1e-4  # a 0.1-point miss at 129 must not double the rank to 256
    layers = [block(i, "gate_proj", (1536, 384), s) for i in range(2)]
    rec = recommend(layers, target=target, rule="energy")
    assert rec is not None and rec.uniform_rank == 130 and not rec.cap_binds and rec.not_low_rank == ()
    assert rec.uniform_captured == pytest.approx(float(e[129]))
    assert 130 in [o.r for o in rec.tradeoff]  # shown beside the ladder, which is for display
    assert [o.r for o in rec.tradeoff if o.r != 130] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 307]
    assert all(o.params_fraction < 1 for o in rec.tradeoff)


def test_recommend_never_returns_a_lora_as_large_as_the_dense_matrix() -> None:
    # Noise-like (flat) ΔW: energy@0.9 asks for rank 346 of 384 on 384×384 (break-even 192).
    rng = np.random.default_rng(0)
    flat = [block(i, kind, (384, 384), 1 + 0.01 * rng.random(384)) for i in range(2) for kind in ("q_proj", "v_proj")]
    rec = recommend(flat, max_rank=1000, rule="energy")
    assert rec is not None
    size = sum(lm.shape[0] * lm.shape[1] for lm in flat)
    assert rec.uniform_rank == 191 and rec.uniform_rank * 768 < 384 * 384  # capped below break-even
    assert rec.allocation_params < size and all(r <= 191 for r in rec.allocation.values())
    assert set(rec.not_low_rank) == {lm.name for lm in flat}
    assert "not low-rank at the energy target" in rec.reason and "lower the target" in rec.reason
    assert all(o.r <= 191 for o in rec.tradeoff)
    low = recommend(flat, target=0.3, rule="energy")  # a lower target is low-rank again
    assert low is not None and low.not_low_rank == () and low.uniform_rank < 191


def test_default_rule_does_not_size_the_lora_to_a_noise_bulk() -> None:
    # A full fine-tune's shape: a few strong directions over an optimizer-noise bulk that fills the spectrum
    # (energy@0.9 then asks for ~half the dense parameters, as on the demo's MiniLM fine-tune).
    rng = np.random.default_rng(0)
    noise = np.linalg.svd(rng.standard_normal((96, 192)), compute_uv=False)
    s = np.concatenate([[120.0, 80.0, 60.0], noise[3:]])
    layers = [block(i, "q_proj", (96, 192), s) for i in range(3)]
    default = recommend(layers)
    energy = recommend(layers, rule="energy")
    assert default is not None and energy is not None
    assert RecommendSettings().rule == "stable" and default.rule == "stable"
    size = 3 * 96 * 192
    assert default.allocation_params < 0.1 * size  # a LoRA, sized to the directions above the bulk
    assert energy.uniform_rank >= 40 and energy.allocation_params > 0.5 * size  # reconstruction: the bulk too
    assert "energy@90%: the rank that reconstructs ΔW" in energy.reason
