"""metrics: planted spectra with answers worked out by hand, float64 oracles, and properties."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import fields, replace
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import integrate, optimize

from builders import layer_metrics
from spectra.analysis.metrics import (
    RANK_RTOL,
    captured_energy,
    compute_metrics,
    effective_rank,
    energy_rank,
    gavish_donoho_rank,
    module_kinds,
    random_rank,
    stable_rank,
    summarize,
)
from spectra.records import Options, Spectrum

# ---------------------------------------------------------------- energy rank: planted spectra


@pytest.mark.parametrize(("threshold", "expected"), [(0.5, 4), (0.9, 8), (1.0, 8), (0.85, 7), (0.125, 1)])
def test_energy_rank_equal_singular_values(threshold: float, expected: int) -> None:
    # rank 8, equal σ: E(k) = k/8, so r = ceil(8τ); the 12 trailing zeros must not count
    s = np.concatenate([np.full(8, 0.37), np.zeros(12)])
    assert energy_rank(s, threshold) == expected
    assert energy_rank(s[:8], threshold, energy=8 * 0.37**2) == expected  # factored: missing values are zero


@pytest.mark.parametrize(("threshold", "expected"), [(0.5, 4), (0.9, 11), (0.99, 22)])
def test_energy_rank_geometric(threshold: float, expected: int) -> None:
    # σᵢ² = 0.81^i, i ≥ 0: E(k) = 1 − 0.81^k, so k = ceil(ln(1 − τ) / ln 0.81):
    # 3.29 -> 4, 10.93 -> 11, 21.85 -> 22
    s = 0.9 ** np.arange(200.0)
    assert energy_rank(s, threshold) == expected


@pytest.mark.parametrize(("threshold", "expected"), [(0.9, 6), (0.99, 57)])
def test_energy_rank_power_law(threshold: float, expected: int) -> None:
    # σᵢ = 1/i, i = 1..1000: Σσ² = 1.643935; 0.9 of it = 1.479541, and Σ_{i≤5} = 1.463611 < 1.479541
    # ≤ Σ_{i≤6} = 1.491389.
    # 0.99: the tail Σ_{i>k} 1/i² ≈ 1/k − 1/(2k²) minus the tail past 1000 (0.0009995) must be ≤ 0.016439:
    # k = 56 leaves 0.016699, k = 57 leaves 0.016391.
    s = 1.0 / np.arange(1.0, 1001.0)
    assert energy_rank(s, threshold) == expected


@pytest.mark.parametrize(("threshold", "expected"), [(0.9, 19), (0.999, 20), (0.9995, 120), (1.0, 220)])
def test_energy_rank_step_over_floor(threshold: float, expected: int) -> None:
    # 20 values at 1 over 200 at 0.01: E = 20.02. 0.9E = 18.018 -> 19; 0.999E = 19.99998 -> 20;
    # 0.9995E = 20.00999 -> 20 + 100 floor values (each adds 1e-4); 1.0 -> all 220.
    s = np.concatenate([np.ones(20), np.full(200, 0.01)])
    assert energy_rank(s, threshold) == expected


def test_energy_rank_zero_and_edges() -> None:
    assert energy_rank(np.zeros(5), 0.9) == 0
    assert energy_rank(np.array([]), 0.9) == 0
    assert energy_rank(np.ones(3), 0.9, energy=0.0) == 0
    assert energy_rank(np.array([1e-3]), 0.9) == 1
    # a directly computed energy slightly above Σσ² (rounding) still clamps to len(s) at τ = 1
    assert energy_rank(np.ones(8), 1.0, energy=8.0 * (1 + 1e-3)) == 8
    # the direct energy sets the target: 3 of 4 unit σ, with ‖ΔW‖² = 4 (a fourth σ lost), τ = 0.5 -> 2
    assert energy_rank(np.ones(3), 0.5, energy=4.0) == 2
    # the comparison is inclusive: a cumulative sum exactly on the (slackened) target counts
    threshold = 0.5000005000005  # threshold · 2 · (1 − RANK_RTOL) == 1.0 exactly in float64
    assert threshold * 2.0 * (1 - RANK_RTOL) == 1.0
    assert energy_rank(np.ones(2), threshold) == 1


def _brute_force_rank(s: np.ndarray, threshold: float) -> int:
    """The definition, one k at a time, with exactly rounded sums."""
    squares = [float(x) ** 2 for x in s]
    total = math.fsum(squares)
    for k in range(1, len(s) + 1):
        if math.fsum(squares[:k]) >= threshold * total * (1 - RANK_RTOL):
            return k
    return len(s)


@pytest.mark.parametrize("seed", range(20))
def test_energy_rank_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    s = np.sort(rng.lognormal(sigma=2.0, size=int(rng.integers(1, 300))))[::-1]
    for threshold in (0.3, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0):
        assert energy_rank(s, threshold) == _brute_force_rank(s, threshold)
        for c in (3.0, 0.1, 1e6):  # scale-free
            assert energy_rank(c * s, threshold) == energy_rank(s, threshold)


# ---------------------------------------------------------------- properties

_sigma = st.one_of(st.just(0.0), st.floats(min_value=1e-6, max_value=1e6))
_descending = st.lists(_sigma, min_size=1, max_size=60).map(lambda v: np.sort(np.array(v))[::-1])
_nonzero_spectra = _descending.filter(lambda s: s[0] > 0)
_threshold = st.floats(min_value=1e-3, max_value=1.0)


@given(_nonzero_spectra, _threshold, _threshold)
def test_energy_rank_monotone_in_threshold(s: np.ndarray, t1: float, t2: float) -> None:
    lo, hi = sorted((t1, t2))
    assert energy_rank(s, lo) <= energy_rank(s, hi)


@given(_nonzero_spectra, _threshold, st.integers(min_value=-20, max_value=20))
def test_energy_rank_scale_free_and_bounded(s: np.ndarray, threshold: float, power: int) -> None:
    rank = energy_rank(s, threshold)
    assert 1 <= rank <= len(s)
    assert rank <= np.count_nonzero(s)
    assert energy_rank(s * 2.0**power, threshold) == rank  # powers of two scale exactly


@given(_nonzero_spectra)
def test_captured_energy_monotone_and_complete(s: np.ndarray) -> None:
    energy = float(np.sum(s**2))
    ranks = list(range(1, len(s) + 5))
    captured = captured_energy(s, ranks, energy)
    values = [captured[r] for r in ranks]
    assert all(a <= b for a, b in itertools.pairwise(values))
    assert all(0.0 < v <= 1.0 for v in values)
    assert captured[len(s)] == pytest.approx(1.0, rel=1e-12)
    assert captured[len(s) + 4] == captured[len(s)]


def test_captured_energy_values() -> None:
    s = np.array([2.0, 1.0])
    assert captured_energy(s, [1, 2, 8], 5.0) == {1: 0.8, 2: 1.0, 8: 1.0}
    assert captured_energy(s, [1, 8], 10.0) == {1: 0.4, 8: 0.5}  # ‖ΔW‖² holds energy beyond the σ given
    assert captured_energy(s, [1], 4.9) == {1: 4 / 4.9}
    assert captured_energy(s, [2], 4.9) == {2: 1.0}  # clipped
    assert captured_energy(np.zeros(3), [1, 2], 0.0) == {1: 0.0, 2: 0.0}


@pytest.mark.parametrize("k", [1, 2, 7, 100])
def test_stable_and_effective_rank_of_equal_values(k: int) -> None:
    s = np.concatenate([np.full(k, 0.3), np.zeros(5)])
    assert stable_rank(s, k * 0.09) == pytest.approx(k, rel=1e-12)
    assert effective_rank(s) == pytest.approx(k, rel=1e-12)


def test_stable_and_effective_rank_values() -> None:
    s = np.array([3.0, 1.0])
    assert stable_rank(s, 10.0) == pytest.approx(10 / 9)
    p = np.array([0.75, 0.25])
    assert effective_rank(s) == pytest.approx(math.exp(-np.sum(p * np.log(p))))
    assert stable_rank(np.zeros(3), 0.0) == 0.0
    assert effective_rank(np.zeros(3)) == 0.0
    assert effective_rank(np.array([])) == 0.0


# ---------------------------------------------------------------- Marchenko–Pastur baseline


@pytest.mark.parametrize(
    ("shape", "expected"),
    [((4096, 4096), 2089), ((4096, 11008), 2917), ((1024, 4096), 780), ((4096, 14336), 3058)],
)
def test_random_rank_reference_values(shape: tuple[int, int], expected: int) -> None:
    # README, What every number means: `random` (sampled SVDs agree ±1); ⌈m·F(t)⌉ itself gives these exactly
    assert random_rank(shape, 0.9) == expected
    assert random_rank(shape[::-1], 0.9) == random_rank(shape, 0.9)


@pytest.mark.parametrize(("threshold", "share"), [(0.9, 0.5098), (0.5, 0.1817), (0.99, 0.7706)])
def test_random_rank_square(threshold: float, share: float) -> None:
    assert abs(random_rank((10000, 10000), threshold) - share * 10000) <= 1
    assert abs(random_rank((4096, 4096), threshold) - share * 4096) <= 1


def _quarter_circle_rank(n: int, threshold: float) -> int:
    """Square case via the quarter-circle law of σ/√n on [0, 2], density √(4 − s²)/π: an independent route."""

    def energy_above(t: float) -> float:
        return float(integrate.quad(lambda x: x * x * math.sqrt(4 - x * x) / math.pi, t, 2)[0]) - threshold

    t = optimize.brentq(energy_above, 0.0, 2.0, xtol=1e-14)
    share = float(integrate.quad(lambda x: math.sqrt(4 - x * x) / math.pi, t, 2)[0])
    return math.ceil(n * share)


def _mp_rank_in_x(m: int, n: int, threshold: float) -> int:
    """MP integrated in x, the (b − x)^½ endpoint as quad's algebraic weight: no substitution involved."""
    q = m / n
    a, b = (1 - math.sqrt(q)) ** 2, (1 + math.sqrt(q)) ** 2

    def above(power: int, t: float) -> float:  # ∫_t^b x^power p(x) dx
        f = lambda x: math.sqrt(x - a) * x ** (power - 1) / (2 * math.pi * q)  # noqa: E731
        return float(integrate.quad(f, t, b, weight="alg", wvar=(0.0, 0.5), epsabs=1e-13)[0])

    t = float(optimize.brentq(lambda t: above(1, t) - threshold, a, b, xtol=1e-14))
    return math.ceil(m * above(0, t))


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.9, 0.99])
def test_random_rank_matches_independent_integrals(threshold: float) -> None:
    assert random_rank((3000, 3000), threshold) == _quarter_circle_rank(3000, threshold)
    for m, n in ((1024, 4096), (4096, 11008), (500, 600), (999, 1000), (2048, 32000), (64, 20000)):
        assert random_rank((m, n), threshold) == _mp_rank_in_x(m, n, threshold)


@pytest.mark.parametrize("shape", [(400, 1000), (300, 300)])
def test_random_rank_matches_gaussian_samples(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(7)
    spectra = [np.linalg.svd(rng.standard_normal(shape), compute_uv=False) for _ in range(3)]
    for threshold in (0.5, 0.9, 0.99):
        sampled = [energy_rank(s, threshold) for s in spectra]
        expected = random_rank(shape, threshold)
        tolerance = max(2, 0.02 * expected)
        assert all(abs(r - expected) <= tolerance for r in sampled), (threshold, sampled, expected)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (2, 3), (3, 2), (5, 5), (2, 1000)])
@pytest.mark.parametrize("threshold", [1e-3, 0.5, 0.9, 1.0])
def test_random_rank_tiny_shapes(shape: tuple[int, int], threshold: float) -> None:
    rank = random_rank(shape, threshold)
    assert 1 <= rank <= min(shape)
    if threshold == 1.0:
        assert rank == min(shape)


def test_random_rank_full_threshold_is_full_rank() -> None:
    assert random_rank((4096, 11008), 1.0) == 4096
    assert random_rank((4096, 4096), 1.0) == 4096


# ---------------------------------------------------------------- Gavish–Donoho


def test_gavish_donoho_planted_rank_5() -> None:
    rng = np.random.default_rng(0)
    m, n = 200, 400
    u, _ = np.linalg.qr(rng.standard_normal((m, 5)))
    v, _ = np.linalg.qr(rng.standard_normal((n, 5)))
    signal = u @ np.diag([400.0, 300.0, 250.0, 200.0, 150.0]) @ v.T  # noise σ stay below √m + √n ≈ 34
    s = np.linalg.svd(signal + rng.standard_normal((m, n)), compute_uv=False)
    assert gavish_donoho_rank(s, (m, n)) == 5
    assert gavish_donoho_rank(s, (n, m)) == 5
    assert gavish_donoho_rank(np.linalg.svd(rng.standard_normal((m, n)), compute_uv=False), (m, n)) == 0


def test_gavish_donoho_threshold_and_padding() -> None:
    # β = 1: ω = 0.56 − 0.95 + 1.82 + 1.43 = 2.86; median of [30, x, 3, 2, 1] is 3 -> threshold 8.58
    assert gavish_donoho_rank(np.array([30.0, 8.59, 3.0, 2.0, 1.0]), (5, 5)) == 2
    assert gavish_donoho_rank(np.array([30.0, 8.57, 3.0, 2.0, 1.0]), (5, 5)) == 1
    # β = 1/2: ω = 0.07 − 0.2375 + 0.91 + 1.43 = 2.1725 -> threshold 6.5175, in either orientation
    for shape in ((5, 10), (10, 5)):
        assert gavish_donoho_rank(np.array([30.0, 6.52, 3.0, 2.0, 1.0]), shape) == 2
        assert gavish_donoho_rank(np.array([30.0, 6.51, 3.0, 2.0, 1.0]), shape) == 1
    # factored: 3 values given of min(shape) = 100, the rest zero, median 0 -> every nonzero σ counts
    assert gavish_donoho_rank(np.array([3.0, 2.0, 1.0]), (100, 300)) == 3
    assert gavish_donoho_rank(np.zeros(4), (4, 4)) == 0


# ---------------------------------------------------------------- module kinds


def test_module_kinds_llama() -> None:
    projections = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    projections += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    names = [f"model.layers.{i}.{p}.weight" for i in range(3) for p in projections]
    names += ["model.embed_tokens.weight", "lm_head.weight"]
    kinds = module_kinds(names)
    assert kinds["model.layers.2.self_attn.q_proj.weight"] == ("q_proj", 2)
    assert kinds["model.layers.0.mlp.down_proj.weight"] == ("down_proj", 0)
    assert kinds["model.embed_tokens.weight"] == ("embed_tokens", None)
    assert kinds["lm_head.weight"] == ("lm_head", None)
    labels = {kind for kind, _ in kinds.values()}
    assert labels == {p.split(".")[1] for p in projections} | {"embed_tokens", "lm_head"}


def test_module_kinds_bert() -> None:
    paths = {
        "attention.self.query": "query",
        "attention.self.key": "key",
        "attention.self.value": "value",
        "attention.output.dense": "attention.output.dense",
        "intermediate.dense": "intermediate.dense",
        "output.dense": "output.dense",
    }
    names = [f"encoder.layer.{i}.{p}.weight" for i in (0, 1) for p in paths]
    kinds = module_kinds(names)
    for i in (0, 1):
        for path, label in paths.items():
            assert kinds[f"encoder.layer.{i}.{path}.weight"] == (label, i)


def test_module_kinds_gpt2() -> None:
    paths = ("attn.c_attn", "attn.c_proj", "mlp.c_fc")
    names = [f"transformer.h.{i}.{p}.weight" for i in (0, 11) for p in paths]
    names += ["transformer.h.11.mlp.c_proj.weight", "transformer.wte.weight"]
    kinds = module_kinds(names)
    assert kinds["transformer.h.11.attn.c_attn.weight"] == ("c_attn", 11)
    assert kinds["transformer.h.0.attn.c_proj.weight"] == ("attn.c_proj", 0)
    assert kinds["transformer.h.11.mlp.c_proj.weight"] == ("mlp.c_proj", 11)
    assert kinds["transformer.h.0.mlp.c_fc.weight"] == ("c_fc", 0)
    assert kinds["transformer.wte.weight"] == ("wte", None)


def test_module_kinds_edges() -> None:
    assert module_kinds([]) == {}
    assert module_kinds(["layers.0.q_proj.weight"]) == {"layers.0.q_proj.weight": ("q_proj", 0)}
    assert module_kinds(["blocks.7.weight"]) == {"blocks.7.weight": ("weight", 7)}
    # only the first numeric component is the layer; later ones belong to the path
    assert module_kinds(["h.3.experts.12.w1.weight"]) == {"h.3.experts.12.w1.weight": ("w1", 3)}
    # nn.Sequential keys start with the index; a non-ASCII digit is not an index
    assert module_kinds(["0.weight", "2.weight"]) == {"0.weight": ("weight", 0), "2.weight": ("weight", 2)}
    assert module_kinds(["a.².weight"]) == {"a.².weight": ("²", None)}


# ---------------------------------------------------------------- compute_metrics and summarize


def _spectrum(s: list[float], **changes: Any) -> Spectrum:
    """A 10×6 bf16 spectrum, ‖ΔW‖² = Σσ², ‖W‖ = 50, noise energy 0.25, unless `changes` say otherwise."""
    values = np.array(s, dtype=np.float64)
    energy = float(np.sum(values**2))
    spectrum = Spectrum("m.layers.0.q_proj.weight", (10, 6), values, energy, 50.0, "bf16", 0.25, "svd-f64")
    return replace(spectrum, **changes)


def test_compute_metrics_values() -> None:
    spectrum = _spectrum([4.0, 3.0])  # energy 25
    lm = compute_metrics(spectrum, Options(threshold=0.9, lora_ranks=(8, 1)), "q_proj", 0)
    assert (lm.name, lm.shape, lm.kind, lm.layer) == ("m.layers.0.q_proj.weight", (10, 6), "q_proj", 0)
    assert lm.rank == 2  # 16 < 22.5 ≤ 25
    assert lm.spectral_norm == 4.0
    assert lm.frobenius_norm == 5.0
    assert lm.relative_change == 0.1
    assert lm.stable_rank == 25 / 16
    assert lm.captured == {1: 16 / 25, 8: 1.0}
    assert lm.lora_params == {1: 16, 8: 128}
    assert lm.random_rank == random_rank((10, 6), 0.9)
    assert lm.noise_fraction == 0.01 and lm.noisy is False
    assert lm.gd_rank == 2  # median over [4, 3, 0, 0, 0, 0] is 0
    assert (lm.dtype, lm.method) == ("bf16", "svd-f64")
    assert lm.s is spectrum.s


def test_compute_metrics_noise_and_missing_base() -> None:
    loud = _spectrum([4.0, 3.0], noise_energy=3.0, base_norm=None)
    lm = compute_metrics(loud, Options(threshold=0.9), "q_proj", 0)
    assert lm.noise_fraction == 0.12 and lm.noisy is True
    assert lm.relative_change is None
    assert compute_metrics(_spectrum([4.0], base_norm=0.0), Options(), "q", 0).relative_change is None
    # at τ = 0.999 the flag's floor is 1%, not 0.1%: 0.5% of noise is not noisy, 1% is
    strict = Options(threshold=0.999)
    assert compute_metrics(_spectrum([4.0, 3.0], noise_energy=0.125), strict, "q", 0).noisy is False
    assert compute_metrics(_spectrum([4.0, 3.0]), strict, "q", 0).noisy is True
    assert compute_metrics(_spectrum([4.0, 3.0], noise_energy=0.0), Options(), "q", 0).noise_fraction == 0.0


def test_compute_metrics_python_scalars_round_trip_json() -> None:
    rng = np.random.default_rng(1)
    s = np.sort(rng.random(6))[::-1]
    lm = compute_metrics(_spectrum(list(s), base_norm=np.float64(3.0)), Options(), "q_proj", None)
    for f in fields(lm):
        value = getattr(lm, f.name)
        if isinstance(value, float):
            assert type(value) is float, f.name
            assert json.loads(json.dumps(value)) == value
        if isinstance(value, int):
            assert type(value) in (int, bool), f.name
        if isinstance(value, dict):
            assert all(type(k) is int and type(v) in (int, float) for k, v in value.items()), f.name


def test_summarize_groups_and_weights() -> None:
    ranks = Options(lora_ranks=(1, 2))
    a = layer_metrics("layers.1.q.weight", (10, 6), [2.0, 1.0], kind="q", layer=1, options=ranks)  # E = 5, rank 2
    b = layer_metrics("layers.0.q.weight", (10, 6), [1.0] * 4, kind="q", layer=0, options=ranks)  # E = 4, rank 4
    c = layer_metrics("layers.0.v.weight", (10, 6), [3.0], kind="v", layer=0, options=ranks)  # E = 9, rank 1
    d = layer_metrics("lm_head.weight", (10, 6), [1.0, 1.0], options=ranks)  # E = 2, rank 2
    summary = summarize([a, b, c, d], [1, 2])
    overall = summary.overall
    assert (overall.key, overall.n, overall.max_rank, overall.median_rank) == ("all", 4, 4, 2.0)
    assert overall.energy == pytest.approx(20.0)
    # E(1): (4 + 1 + 9 + 1) / 20, E(2): (5 + 2 + 9 + 2) / 20
    assert overall.captured == {1: pytest.approx(15 / 20), 2: pytest.approx(18 / 20)}
    assert [g.key for g in summary.kinds] == ["q", "v", "lm_head"]
    assert [g.key for g in summary.layers] == ["0", "1"]
    assert [g.n for g in summary.layers] == [2, 1]
    q = summary.kinds[0]
    assert (q.n, q.median_rank, q.max_rank) == (2, 3.0, 4)
    assert q.captured == {1: pytest.approx(5 / 9), 2: pytest.approx(7 / 9)}
    ratios = [m.rank / m.random_rank for m in (a, b)]
    assert q.median_rank_ratio == pytest.approx(float(np.median(ratios)))
    assert summary.layers[0].energy == pytest.approx(13.0)
    assert overall.n_noisy == sum(m.noisy for m in (a, b, c, d))


def test_summarize_empty() -> None:
    summary = summarize([], [8])
    assert summary.overall.n == 0 and summary.overall.captured == {8: 0.0}
    assert summary.kinds == () and summary.layers == ()


def test_reading_order_lists_blocks_in_execution_order() -> None:
    from spectra.analysis.metrics import reading_order

    names = [
        "lm_head.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.mystery.weight",
    ]
    kinds = module_kinds(names)
    ordered = sorted(names, key=lambda n: reading_order(*kinds[n]))
    assert ordered == [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mystery.weight",
        "model.layers.1.mlp.down_proj.weight",
        "lm_head.weight",
    ]
