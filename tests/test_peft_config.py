"""spectra.peft.layout's indexed matching equals PEFT's own functions; build_adapter_config from (module -> kind,
module -> rank) with alphas and extra fields; resized_config keeps the user's config; MoE-sized layouts stay fast.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectra import OptionsError, SpectraError
from spectra.names import module_kinds
from spectra.peft.config import EXCLUDE_NOTE, build_adapter_config, resized_config
from spectra.peft.layout import Patterns, list_hits, list_index, literal_pattern, pattern_regex
from spectra.peft.read import read_lora_settings

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning")]  # regexes like "[[" that random keys make
peft_other = pytest.importorskip("peft.utils.other")
tuners_utils = pytest.importorskip("peft.tuners.tuners_utils")
peft = pytest.importorskip("peft")

LLAMA = [
    f"model.layers.{i}.{sub}.{kind}"
    for i in range(12)
    for sub, kinds in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj")))
    for kind in kinds
] + ["model.embed_tokens", "lm_head", "model.layers.1.xq_proj"]
NESTED = [*LLAMA, "vision.model.layers.1.self_attn.q_proj"]  # a full name ending another: no list entry separates them


def peft_first(keys: list[str], module: str) -> str | None:
    key = peft_other.get_pattern_key(keys, module)
    return key if key in keys and re.match(pattern_regex(key), module) else None


# ---------------------------------------------------------------- the mirror against PEFT


module_names = st.lists(st.sampled_from(["a", "b", "q_proj", "1", "11", "x.y", "", "\n", "é", "-"]), max_size=5).map(
    ".".join
)
literal_keys = st.one_of(
    module_names, module_names.map(literal_pattern), module_names.map(lambda m: "^" + re.escape(m))
)
keys = st.one_of(
    literal_keys,
    st.lists(literal_keys, min_size=1, max_size=4).map(lambda ks: f"(?:{'|'.join(ks)})"),  # merged keys
    st.text(alphabet="ab1.q_proj-\\*+?()[]|^$é\n", max_size=8),
)


@settings(max_examples=300, deadline=None, database=None)
@given(keys=st.lists(keys, max_size=6, unique=True), modules=st.lists(module_names, max_size=8))
def test_patterns_equal_peft_get_pattern_key(keys: list[str], modules: list[str]) -> None:
    """Random keys (literal, escaped, regex) and names (dots, digits, newlines): the index never differs from
    PEFT's get_pattern_key (first key) nor from its expression (every key), PEFT ≥ 0.15 and the legacy form."""

    def compiles(key: str, legacy: bool) -> bool:
        try:
            re.compile(pattern_regex(key, legacy))
        except re.error:
            with pytest.raises(re.error):
                Patterns([key], legacy)
            return False
        return True

    valid = [k for k in keys if compiles(k, False)]
    old = [k for k in keys if compiles(k, True)]
    index, legacy = Patterns(valid), Patterns(old, legacy=True)
    for module in modules:
        assert index.first(module) == peft_first(valid, module), (valid, module)
        assert index.matches(module) == [k for k in valid if re.match(pattern_regex(k), module)]
        assert legacy.matches(module) == [k for k in old if re.match(pattern_regex(k, True), module)]
    hits = index.hits(modules)
    assert all(hits[k] == {m for m in modules if re.match(pattern_regex(k), m)} for k in valid)


def test_list_index_equals_check_target_module_exists() -> None:
    index = list_index(NESTED)
    suffixes = {".".join(m.split(".")[-k:]) for m in NESTED for k in range(1, 6)} | {"proj", "q_pro", "layers.1"}
    for entry in sorted(suffixes):
        config = peft.LoraConfig(target_modules=[entry])
        expected = {m for m in NESTED if tuners_utils.check_target_module_exists(config, m)}
        assert index.get(entry, set()) == expected == list_hits(entry, NESTED), entry


def test_wildcard_dots_are_regex_dots() -> None:
    """A key's unescaped dot matches any character, as in PEFT: "layers.1.q_proj" also fits "layers.1xq_proj"."""
    modules = ["model.layers.1.q_proj", "model.layers.1xq_proj", "model.layers.11.q_proj", "layers.1.q_proj"]
    hits = Patterns(["layers.1.q_proj", r"layers\.1\.q_proj"]).hits(modules)
    assert hits["layers.1.q_proj"] == {"model.layers.1.q_proj", "model.layers.1xq_proj", "layers.1.q_proj"}
    assert hits[r"layers\.1\.q_proj"] == {"model.layers.1.q_proj", "layers.1.q_proj"}
    assert Patterns(["layers.1.q_proj"], legacy=True).hits(modules)["layers.1.q_proj"] == {
        "model.layers.1.q_proj",
        "model.layers.1xq_proj",
    }


# ---------------------------------------------------------------- build_adapter_config


def kinds_of(modules: list[str]) -> dict[str, str]:
    return {m: kind for m, (kind, _) in module_kinds(modules).items()}


def peft_reads(config: dict[str, Any], module: str) -> tuple[int, float] | None:
    """(r, lora_alpha) as PEFT 0.21 derives them, from its own functions."""
    lora = peft.LoraConfig(**{k: v for k, v in config.items() if k not in ("peft_type",)})
    if not tuners_utils.check_target_module_exists(lora, module) or type(
        tuners_utils.check_target_module_exists(lora, module)
    ).__name__.startswith("_Excluded"):
        return None
    r = lora.rank_pattern.get(peft_other.get_pattern_key(list(lora.rank_pattern), module), lora.r)
    alpha = lora.alpha_pattern.get(peft_other.get_pattern_key(list(lora.alpha_pattern), module), lora.lora_alpha)
    return int(r), float(alpha)


def test_explicit_alphas_and_extra_fields() -> None:
    kinds = kinds_of(LLAMA)
    ranks = {m: (1 + i % 3 if "proj" in m else 0) for i, m in enumerate(LLAMA)}
    alphas = {m: 0.5 * (1 + i % 5) for i, m in enumerate(LLAMA)}
    extra = {"lora_dropout": 0.1, "lora_bias": False, "modules_to_save": ["lm_head"]}
    config, notes = build_adapter_config(
        kinds, ranks, rslora=True, task_type="CAUSAL_LM", base_model="b", alphas=alphas, extra=extra
    )
    assert config["lora_dropout"] == 0.1 and config["modules_to_save"] == ["lm_head"] and config["use_rslora"]
    assert set(config["rank_pattern"]) != set(config["alpha_pattern"])  # alphas need not follow ranks
    for m in LLAMA:
        want = (ranks[m], float(_tidy(alphas[m]))) if ranks[m] else None
        assert peft_reads(config, m) == want, m
    assert EXCLUDE_NOTE in notes or "exclude_modules" not in config


@pytest.mark.parametrize("outer", [0, 3])
def test_nested_names_get_exact_keys(outer: int) -> None:
    """ "model.layers.1.self_attn.q_proj" ends "vision.model.layers.1.self_attn.q_proj": no list entry or suffix key
    names one without the other, so target_modules becomes an expression and keys are anchored with "^"."""
    ranks = {m: 2 if m.endswith("q_proj") else 0 for m in NESTED}
    ranks["vision.model.layers.1.self_attn.q_proj"] = outer
    ranks["model.layers.1.self_attn.q_proj"] = 5
    config, notes = build_adapter_config(kinds_of(NESTED), ranks, rslora=False, task_type=None, base_model=None)
    assert isinstance(config["target_modules"], str) and all(k.startswith("^") for k in config["rank_pattern"])
    assert any("PEFT ≥ 0.15" in n for n in notes)  # older PEFT's `.*\.{key}$` never matches "^..."
    for m in NESTED:
        assert peft_reads(config, m) == ((ranks[m], 2.0 * ranks[m]) if ranks[m] else None), m


def test_nested_names_with_merged_exact_keys() -> None:
    """The exact fallback on a layout with hundreds of keys: anchored names merged into "(?:^a|^b|...)" keys."""
    modules = [*moe(4, 40), "vision.model.layers.1.block_sparse_moe.experts.3.w1"]
    rng = random.Random(1)
    ranks = {m: rng.randint(1, 6) for m in modules}
    config, _ = build_adapter_config(kinds_of(modules), ranks, rslora=False, task_type=None, base_model=None)
    assert isinstance(config["target_modules"], str) and len(config["rank_pattern"]) < 20
    assert all(k.startswith("(?:^") for k in config["rank_pattern"])
    lora = peft.LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"})
    for m in modules:
        assert tuners_utils.check_target_module_exists(lora, m)
        assert lora.rank_pattern.get(peft_other.get_pattern_key(list(lora.rank_pattern), m), lora.r) == ranks[m]


def _tidy(x: float) -> float:
    return int(x) if float(x).is_integer() else x


def test_checkpoint_keys_accepted_and_collisions_refused() -> None:
    kinds = {f"{m}.weight": k for m, k in kinds_of(LLAMA[:6]).items()}
    config, _ = build_adapter_config(kinds, dict.fromkeys(kinds, 4), rslora=False, task_type=None, base_model=None)
    assert config["r"] == 4 and config["lora_alpha"] == 8 and not config["rank_pattern"]
    with pytest.raises(SpectraError, match="share a module name"):
        build_adapter_config({"a.weight": "a", "a": "a"}, {"a": 1}, rslora=False, task_type=None, base_model=None)


@pytest.mark.parametrize(
    ("ranks", "alphas", "extra", "match"),
    [
        ({"lm_head": -1}, None, None, "integers ≥ 0"),
        ({"lm_head": 2.0}, None, None, "integers ≥ 0"),
        ({"lm_head": True}, None, None, "integers ≥ 0"),
        ({"lm_head": 0}, None, None, "every module has rank 0"),
        ({"nowhere": 2}, None, None, "missing from kinds"),
        ({"lm_head": 2}, {"lm_head": math.nan}, None, "finite and > 0"),
        ({"lm_head": 2}, {}, None, "must be given for every ranked module"),
        ({"lm_head": 2}, None, {"r": 4}, "computed or not supported"),
        ({"lm_head": 2}, None, {"use_dora": True}, "computed or not supported"),
        ({"lm_head": 2}, None, {"layers_to_transform": [0]}, "computed or not supported"),
        ({"lm_head": 2}, None, {"modules_to_save": ["lm_head"]}, "also in modules_to_save"),
    ],
)
def test_bad_arguments(ranks: dict[str, Any], alphas: Any, extra: Any, match: str) -> None:
    with pytest.raises(OptionsError, match=match):
        build_adapter_config(
            kinds_of(LLAMA), ranks, rslora=False, task_type=None, base_model=None, alphas=alphas, extra=extra
        )


def moe(n_layers: int, n_experts: int) -> list[str]:
    return [
        f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}" for i in range(n_layers) for e in range(n_experts)
        for w in ("w1", "w2", "w3")
    ]  # fmt: skip


def test_moe_layout_is_fast_and_stays_fast_for_peft(tmp_path: Path) -> None:
    """3,072 expert matrices with a rank each: the old key × module scan took minutes, and one key per matrix made
    PEFT itself take minutes (beyond Python's regex cache it recompiles every key for every module); merged keys
    keep both fast, and read_lora_settings reads the config back."""
    modules = moe(32, 32)
    rng = random.Random(0)
    ranks = {m: rng.randint(1, 16) for m in modules}
    start = time.perf_counter()
    config, _ = build_adapter_config(kinds_of(modules), ranks, rslora=False, task_type=None, base_model=None)
    assert time.perf_counter() - start < 5.0  # ≈0.3 s here
    assert len(config["rank_pattern"]) + len(config["alpha_pattern"]) <= 64
    assert all(len(key) <= 8000 for key in config["rank_pattern"])
    start = time.perf_counter()
    for m in modules:
        key = peft_other.get_pattern_key(list(config["rank_pattern"]), m)
        assert config["rank_pattern"].get(key, config["r"]) == ranks[m], m
    assert time.perf_counter() - start < 5.0  # PEFT's own lookup, ≈1 s here
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    settings_ = read_lora_settings(tmp_path)
    assert all(settings_.rank_and_alpha(m) == (ranks[m], 2.0 * ranks[m]) for m in modules)


# ---------------------------------------------------------------- resized_config


USER = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": "meta-llama/Llama-3.2-1B",
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "bias": "none",
    "target_modules": ["q_proj", "v_proj"],
    "rank_pattern": {r"layers\.0\..*": 8},
    "alpha_pattern": {"v_proj": 8},
    "use_rslora": False,
    "init_lora_weights": "gaussian",
    "modules_to_save": None,
    "peft_version": "0.21.2",
}
ADAPTED = [m for m in LLAMA if m.startswith("model.layers.") and m.endswith(("q_proj", "v_proj")) and "xq" not in m]


def test_resized_config_keeps_the_user_fields_and_scales() -> None:
    ranks = {m: 1 + i % 4 for i, m in enumerate(ADAPTED)}
    config, notes = resized_config(USER, ranks)
    changed = {k for k in config.keys() | USER.keys() if config.get(k) != USER.get(k)}
    assert changed <= {"r", "lora_alpha", "rank_pattern", "alpha_pattern"}
    assert notes == ()
    for m in ADAPTED:
        old = peft_reads(USER, m)
        assert old is not None
        new_r, new_alpha = peft_reads(config, m) or (0, 0.0)
        assert new_r == ranks[m] and new_alpha / new_r == pytest.approx(old[1] / old[0])  # the scale is kept


def test_resized_config_alphas_rslora_and_dropped_modules() -> None:
    ranks = {m: (0 if i % 5 == 0 else 2 + i % 3) for i, m in enumerate(ADAPTED)}
    alphas = {m: 3.0 for m in ADAPTED}
    config, notes = resized_config({**USER, "use_rslora": True}, ranks, alphas)
    assert EXCLUDE_NOTE in notes and set(config["exclude_modules"]) == {m for m, r in ranks.items() if r == 0}
    for m in ADAPTED:
        assert peft_reads(config, m) == ((ranks[m], 3.0) if ranks[m] else None), m
    as_regex, _ = resized_config({**USER, "exclude_modules": r".*\.k_proj"}, ranks, alphas)
    assert as_regex["exclude_modules"].startswith(r"(?:.*\.k_proj)|")
    for m in ADAPTED:
        assert peft_reads(as_regex, m) == ((ranks[m], 3.0) if ranks[m] else None), m


def test_resized_config_of_a_peft_written_config(tmp_path: Path) -> None:
    """The raw config PEFT itself saved, read back by read_lora_settings, resized: PEFT reads the new ranks."""
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
    lora.save_pretrained(str(tmp_path))
    settings_ = read_lora_settings(tmp_path)
    ranks = {m: 1 + i % 5 for i, m in enumerate(ADAPTED)}
    config, _ = resized_config(settings_.raw, ranks)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k for k in saved if saved[k] != config[k]} <= {"r", "lora_alpha", "rank_pattern", "alpha_pattern"}
    for m in ADAPTED:
        assert peft_reads(config, m) == (ranks[m], 2.0 * ranks[m])
