"""PEFT LoRA adapters, written by peft itself: spectra's factored spectra equal those of PEFT's own merged ΔW.

Tiny Llama / GPT-2 models with random weights built from configs (no download). lora_A and lora_B are randomised
before saving (PEFT initialises lora_B to zero). The oracle is merge_and_unload() minus the base, float64 SVD.
Runs by default (a few seconds, most of it importing transformers).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from spectra import Analysis, CheckpointError, MismatchError, Options, analyze, load_analysis, save_analysis
from spectra.analysis.metrics import energy_rank
from spectra.io.checkpoint import open_checkpoint
from spectra.io.tensors import Handles
from spectra.peft.layout import pattern_key
from spectra.peft.read import LoraSettings, read_lora_settings
from spectra.plan.adapter import plan_adapter
from spectra.plan.delta import make_delta
from spectra.plan.jobs import Factored
from spectra.records import Delta

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
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"]},
    "pattern": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj", "down_proj", "gate_proj"],
        "rank_pattern": {"layers.1.self_attn.q_proj": 2, "down_proj": 6},
        "alpha_pattern": {"v_proj": 3, r"layers\.0\.mlp\.gate_proj": 40},
    },
    "rslora": {"r": 8, "lora_alpha": 5, "target_modules": ["q_proj", "o_proj", "gate_proj"], "use_rslora": True},
}
RANKS = {
    "plain": {},
    "pattern": {
        "model.layers.1.self_attn.q_proj.weight": 2,
        "model.layers.0.mlp.down_proj.weight": 6,
        "model.layers.1.mlp.down_proj.weight": 6,
    },
    "rslora": {},
}


class Written:
    """A peft-written adapter folder and the oracle: PEFT's merged ΔW per base key (float64)."""

    def __init__(self, folder: Path, merged_delta: dict[str, np.ndarray], r: int) -> None:
        self.folder, self.merged_delta, self.r = folder, merged_delta, r


def randomise_lora(model: Any, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # A and B (and embedding A/B); B would otherwise be zero
                p.copy_(torch.randn(p.shape, generator=g) * (0.05 if "_B" in name else 1.0 / p.shape[-1] ** 0.5))


def write_adapter(
    base_model: Any, base_sd: dict[str, torch.Tensor], folder: Path, config: Any, seed: int = 1
) -> Written:
    model = peft.get_peft_model(copy.deepcopy(base_model), config)
    randomise_lora(model, seed)
    model.save_pretrained(str(folder))
    merged = model.merge_and_unload().state_dict()
    deltas = {k: (w.double() - base_sd[k].double()).numpy() for k, w in merged.items() if k in base_sd}
    return Written(folder, {k: d for k, d in deltas.items() if np.any(d)}, config.r)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("llama") / "model.safetensors"
    save_file(sd, str(path))
    return model, path, sd


@pytest.fixture(scope="module")
def adapters(
    llama: tuple[Any, Path, dict[str, torch.Tensor]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Written]:
    model, _, sd = llama
    root = tmp_path_factory.mktemp("adapters")
    return {name: write_adapter(model, sd, root / name, peft.LoraConfig(**kw)) for name, kw in VARIANTS.items()}


def assert_matches_merge(
    analysis: Analysis, written: Written, ranks: dict[str, int], base_sd: dict[str, torch.Tensor] | None
) -> None:
    layers = {lm.name: lm for lm in analysis.layers}
    assert set(layers) == set(written.merged_delta)  # named by the base model's keys
    for name, delta in written.merged_delta.items():
        lm, ref = layers[name], np.linalg.svd(delta, compute_uv=False)
        r = ranks.get(name, written.r)
        assert lm.shape == delta.shape and lm.method == "factored-f64" and len(lm.s) == r
        np.testing.assert_allclose(lm.s, ref[:r], rtol=1e-5)
        assert ref[r:].max(initial=0.0) < 1e-5 * ref[0]  # PEFT's ΔW has rank r too
        assert lm.rank == energy_rank(ref, analysis.options.threshold)
        assert lm.frobenius_norm == pytest.approx(np.linalg.norm(delta), rel=1e-5)
        assert lm.noise_fraction == 0.0 and not lm.noisy
        if base_sd is None:
            assert lm.relative_change is None
        else:
            expected = np.linalg.norm(delta) / float(torch.linalg.vector_norm(base_sd[name].double()))
            assert lm.relative_change == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_spectra_equal_those_of_peft_merged_delta(llama: Any, adapters: dict[str, Written], variant: str) -> None:
    _, base, sd = llama
    analysis = analyze(str(base), str(adapters[variant].folder), Options(precision="exact"))
    assert_matches_merge(analysis, adapters[variant], RANKS[variant], sd)
    assert analysis.tuned_info.format == "peft-adapter" and analysis.base_info is not None


def test_embedding_and_lm_head_orientation(llama: Any, adapters: dict[str, Written]) -> None:
    """lora_embedding_A/B give ΔW = (B@A)ᵀ, shaped like the embedding (vocab, hidden); lm_head is a Linear."""
    _, base, _ = llama
    layers = {lm.name: lm for lm in analyze(str(base), str(adapters["plain"].folder)).layers}
    assert layers["model.embed_tokens.weight"].shape == (100, 64)
    assert layers["lm_head.weight"].shape == (100, 64)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_adapter_alone(adapters: dict[str, Written], variant: str, tmp_path: Path) -> None:
    analysis = analyze(None, str(adapters[variant].folder), Options(precision="exact"))
    assert_matches_merge(analysis, adapters[variant], RANKS[variant], None)
    assert analysis.base is None and analysis.base_info is None
    assert any("relative change" in note for note in analysis.notes)
    again = load_analysis(save_analysis(analysis, tmp_path / "a.json"))
    assert again.base is None and again.notes == analysis.notes


def test_adapter_never_forms_dense_delta(llama: Any, adapters: dict[str, Written]) -> None:
    """The adapter plan holds factored jobs only, and materialising one yields the factors, never B@A."""
    _, base, _ = llama
    with open_checkpoint(str(adapters["pattern"].folder)) as adapter, open_checkpoint(str(base)) as base_ck:
        plan = plan_adapter(adapter, base_ck, Options())
    assert plan.jobs and all(isinstance(job.operand, Factored) for job in plan.jobs)
    handles = Handles()
    try:
        deltas = [make_delta(job, handles) for job in plan.jobs]
    finally:
        handles.close()
    for d in deltas:
        assert isinstance(d, Delta) and d.values is None and d.factors is not None and d.noise_energy == 0.0
        (m, r1), (r2, n) = d.factors[0].shape, d.factors[1].shape
        assert (m, n) == d.shape and r1 == r2 == RANKS["pattern"].get(d.name, 4)
    analysis = analyze(str(base), str(adapters["pattern"].folder))
    assert {lm.name for lm in analysis.layers} == {job.name for job in plan.jobs}
    assert {lm.method for lm in analysis.layers} == {"factored-f64"}


def test_adapter_name_infix_and_file_path(llama: Any, adapters: dict[str, Written], tmp_path: Path) -> None:
    """Keys like `.lora_A.default.weight` and `.lora_embedding_A.default` (other PEFT versions) read the same."""
    _, base, sd = llama
    written = adapters["plain"]
    tensors = load_file(str(written.folder / "adapter_model.safetensors"))
    renamed = {}
    for key, value in tensors.items():
        for part in ("lora_A", "lora_B"):
            key = key.replace(f".{part}.weight", f".{part}.default.weight")
        for part in ("lora_embedding_A", "lora_embedding_B"):
            key = key.replace(f".{part}", f".{part}.default") if key.endswith(part) else key
        renamed[key] = value
    assert any(".lora_A.default.weight" in k for k in renamed) and any(k.endswith("A.default") for k in renamed)
    folder = tmp_path / "infix"
    folder.mkdir()
    save_file(renamed, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text((written.folder / "adapter_config.json").read_text())
    assert_matches_merge(analyze(str(base), str(folder), Options(precision="exact")), written, {}, sd)
    by_file = analyze(str(base), str(folder / "adapter_model.safetensors"))  # the weights file itself
    assert by_file.tuned_info.format == "peft-adapter" and len(by_file.layers) == len(written.merged_delta)


def test_gpt2_conv1d_fan_in_fan_out(tmp_path: Path) -> None:
    """GPT-2's Conv1D stores W as (in, out) and PEFT merges (B@A)ᵀ; spectra reports the base weight's shape."""
    torch.manual_seed(3)
    model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    )
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file({k: v for k, v in sd.items() if "attn.bias" not in k}, str(tmp_path / "base.safetensors"))
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    written = write_adapter(model, sd, tmp_path / "gpt2", config)
    with_base = analyze(str(tmp_path / "base.safetensors"), str(written.folder), Options(precision="exact"))
    assert_matches_merge(with_base, written, {}, sd)
    alone = analyze(None, str(written.folder), Options(precision="exact"))
    assert {lm.name: lm.shape for lm in alone.layers} == {k: d.shape for k, d in written.merged_delta.items()}


def test_rank_and_alpha_patterns_follow_peft(tmp_path: Path) -> None:
    """Pattern lookup equals peft.utils.other.get_pattern_key (regex keys, first match wins, (.*\\.)? prefix)."""
    from peft.utils.other import get_pattern_key

    patterns = {"layers.1.self_attn.q_proj": 2, "down_proj": 6, r"layers\.[02]\..*proj": 5, "q_proj": 7}
    settings = LoraSettings(
        r=4,
        lora_alpha=8.0,
        use_rslora=False,
        fan_in_fan_out=False,
        rank_pattern=patterns,
        alpha_pattern={"v_proj": 3.0},
        variant=None,
        modules_to_save=(),
        target_parameters=(),
    )
    modules = [
        f"model.layers.{i}.{m}"
        for i in range(4)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj", "mlp.up_proj")
    ]
    modules += ["model.layers.11.self_attn.q_proj", "model.xlayers.1.self_attn.q_proj", "lm_head"]
    for module in modules:
        r = patterns.get(get_pattern_key(list(patterns), module), 4)
        alpha = {"v_proj": 3.0}.get(get_pattern_key(["v_proj"], module), 8.0)
        assert settings.rank_and_alpha(module) == (r, alpha), module
        assert pattern_key(patterns, module) == get_pattern_key(list(patterns), module)
    assert settings.scale("model.layers.1.self_attn.v_proj") == 3.0 / 4


def test_dora_adapter_without_base_is_refused(llama: Any, tmp_path: Path) -> None:
    """DoRA's ΔW depends on W: refused without BASE (tests/test_dora.py checks it with BASE against PEFT)."""
    model, _, sd = llama
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    written = write_adapter(model, sd, tmp_path / "dora", config)
    with pytest.raises(CheckpointError, match=r"DoRA.*pass the base model as BASE"):
        analyze(None, str(written.folder))


def test_magnitude_vectors_and_extras_are_skipped_never_misread(llama: Any, tmp_path: Path) -> None:
    """A DoRA magnitude vector on one module, modules_to_save, LoRA biases and trainable tokens: each is skipped
    with its reason; the plain LoRA modules are still analysed exactly."""
    model, base, sd = llama
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["lm_head"],
        trainable_token_indices=[1, 2],
    )
    written = write_adapter(model, sd, tmp_path / "extras", config)
    file = written.folder / "adapter_model.safetensors"
    tensors = load_file(str(file))
    tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector"] = torch.ones(32)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"] = torch.ones(64)  # lora_bias=True
    save_file(tensors, str(file))
    analysis = analyze(str(base), str(written.folder), Options(precision="exact"))
    skipped = {s.name: s for s in analysis.skipped}
    dora = skipped.pop("model.layers.1.self_attn.v_proj.weight")
    assert dora.reason == "unsupported" and "DoRA" in dora.detail
    assert skipped.pop("base_model.model.lm_head.weight").detail.startswith("a modules_to_save copy")
    tokens = [k for k in skipped if "trainable_tokens" in k]
    assert len(tokens) == 1 and skipped.pop(tokens[0]).reason == "unsupported"
    assert {s.reason for s in skipped.values()} == {"not-2d"} and all("bias" in k for k in skipped)
    expected = {k: d for k, d in written.merged_delta.items() if "layers.1.self_attn.v_proj" not in k}
    layers = {lm.name: lm for lm in analysis.layers}
    assert set(layers) == {k for k in expected if k.endswith(("q_proj.weight", "v_proj.weight"))}
    for name, lm in layers.items():
        np.testing.assert_allclose(lm.s, np.linalg.svd(expected[name], compute_uv=False)[:4], rtol=1e-5)


@pytest.mark.parametrize(
    ("make_config", "kind"),
    [
        (lambda: peft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]), "IA3"),
        (lambda: peft.LoKrConfig(r=4, target_modules=["q_proj"]), "LOKR"),
    ],
)
def test_non_lora_adapters_are_refused(llama: Any, tmp_path: Path, make_config: Callable[[], Any], kind: str) -> None:
    model, base, _ = llama
    peft.get_peft_model(copy.deepcopy(model), make_config()).save_pretrained(str(tmp_path / "a"))
    with pytest.raises(CheckpointError, match=f"type {kind} is not supported"):
        analyze(str(base), str(tmp_path / "a"))


def test_base_mismatches_are_skipped(llama: Any, adapters: dict[str, Written], tmp_path: Path) -> None:
    _, _, sd = llama
    other = dict(sd)
    other["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 48)
    del other["model.layers.1.self_attn.v_proj.weight"]
    save_file(other, str(tmp_path / "other.safetensors"))
    analysis = analyze(str(tmp_path / "other.safetensors"), str(adapters["plain"].folder))
    reasons = {s.name: (s.reason, s.detail) for s in analysis.skipped}
    q_proj = ("shape-mismatch", "base (64, 48) vs adapter ΔW (64, 64)")
    assert reasons["model.layers.0.self_attn.q_proj.weight"] == q_proj
    assert reasons["model.layers.1.self_attn.v_proj.weight"][0] == "only-in-tuned"
    assert len(analysis.layers) == len(adapters["plain"].merged_delta) - 2


def test_base_prefix_is_normalised(llama: Any, adapters: dict[str, Written], tmp_path: Path) -> None:
    """A base saved without the `model.` wrapper prefix still lines up; layers keep the base checkpoint's keys."""
    _, _, sd = llama
    bare = {k.removeprefix("model."): v for k, v in sd.items() if k.startswith("model.")}
    save_file(bare, str(tmp_path / "bare.safetensors"))
    analysis = analyze(str(tmp_path / "bare.safetensors"), str(adapters["rslora"].folder))
    assert {lm.name for lm in analysis.layers} == {k.removeprefix("model.") for k in adapters["rslora"].merged_delta}
    assert all(lm.relative_change is not None for lm in analysis.layers)


def test_include_filter_applies_to_base_keys(llama: Any, adapters: dict[str, Written]) -> None:
    _, base, _ = llama
    analysis = analyze(str(base), str(adapters["plain"].folder), Options(include=r"q_proj"))
    assert {lm.kind for lm in analysis.layers} == {"q_proj"}
    assert sum(s.reason == "excluded" for s in analysis.skipped) == 6  # v, down x2 layers + embed + lm_head


def test_untrained_adapter(llama: Any, tmp_path: Path) -> None:
    model, base, _ = llama
    peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        str(tmp_path / "fresh")
    )  # lora_B = 0
    with pytest.raises(MismatchError, match="was the adapter trained"):
        analyze(str(base), str(tmp_path / "fresh"))


def test_non_finite_adapter_factor(llama: Any, adapters: dict[str, Written], tmp_path: Path) -> None:
    _, base, _ = llama
    folder = tmp_path / "nan"
    folder.mkdir()
    (folder / "adapter_config.json").write_text((adapters["plain"].folder / "adapter_config.json").read_text())
    weights = load_file(str(adapters["plain"].folder / "adapter_model.safetensors"))
    key = next(k for k in sorted(weights) if "lora_A" in k)
    weights[key][0, 0] = float("nan")
    save_file(weights, str(folder / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"adapter tensor '{key}' holds 1 NaN/Inf value "):
        analyze(str(base), str(folder))


def test_wrong_inputs(llama: Any, adapters: dict[str, Written], tmp_path: Path) -> None:
    _, base, _ = llama
    folder = adapters["plain"].folder
    with pytest.raises(CheckpointError, match="not a PEFT adapter"):
        analyze(None, str(base))
    with pytest.raises(CheckpointError, match="BASE is a PEFT adapter"):
        analyze(str(folder), str(base))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(CheckpointError, match=r"no adapter_model\.safetensors"):
        analyze(str(base), str(bad))
    (bad / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pickle"):
        analyze(str(base), str(bad))
    (bad / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable PEFT adapter config"):
        analyze(str(base), str(bad))
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "rank_pattern": {"(": 2}}))
    with pytest.raises(CheckpointError, match="malformed LoRA config"):
        read_lora_settings(bad)


def test_cli_adapter_alone_and_with_base(llama: Any, adapters: dict[str, Written]) -> None:
    from typer.testing import CliRunner

    from spectra_cli.app import app

    _, base, _ = llama
    folder = str(adapters["plain"].folder)
    alone = CliRunner().invoke(app, ["rank", folder])
    assert alone.exit_code == 0, alone.output
    assert "(adapter alone)" in alone.stdout and "note:" in alone.stdout and "relative change" in alone.stdout
    both = CliRunner().invoke(app, ["rank", str(base), folder, "--tsv"])
    assert both.exit_code == 0, both.output
    rows = [line.split("\t") for line in both.stdout.strip().splitlines()]
    assert len(rows) - 1 == len(adapters["plain"].merged_delta) and all(r[9] != "" for r in rows[1:])
