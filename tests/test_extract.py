"""`spectra extract`: a full fine-tune → a PEFT LoRA adapter, checked through PEFT itself.

Round trip: the written adapter is loaded on the base with peft, merged (merge_and_unload) and compared with TUNED:
per module ‖W_merged − W_tuned‖_F / ‖ΔW‖_F must equal the predicted error √(1 − E(r)) within 1% — on planted
pairs (exact ranks known in advance: a rank-8 ΔW at r = 8 gives ~0) against a float64 scipy SVD, and on tiny
random-init Llama, BERT and GPT-2 models after a few optimizer steps of full fine-tuning. Plus the per-job TopK
and Energy kernels, bias changes (lora_bias), what is left out, bad inputs (one line, exit 1, nothing written),
streaming writes and the CLI.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

import spectra
from conftest import PairFactory, planted_matrix, requires_cuda, save_checkpoint
from spectra import ExtractResult, MismatchError, Options, OptionsError, RankRule, SpectraError
from spectra.engine import Energy, LocalExecutor, TopK, run
from spectra.io.checkpoint import open_checkpoint
from spectra.peft.write import AdapterWriter
from spectra.plan.dense import plan_pair
from spectra.records import Delta, Factors
from spectra_cli.app import app

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

CPU = Options(device="cpu")
LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
LLAMA |= {"num_key_value_heads": 1, "vocab_size": 60}
BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 48}
BERT |= {"vocab_size": 60, "max_position_embeddings": 16}
GPT2 = {"n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 60, "n_positions": 16}
runner = CliRunner()


# ---------------------------------------------------------------------------------------------------- models


def fine_tune(model: Any, folder: Path, steps: int = 3, seed: int = 0, causal: bool = True) -> None:
    """Save `model` as base/, take a few AdamW steps of full fine-tuning on random tokens, save as tuned/."""
    model.save_pretrained(str(folder / "base"), safe_serialization=True)
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        ids = torch.randint(0, 60, (4, 12), generator=g)
        loss = model(input_ids=ids, labels=ids).loss if causal else model(input_ids=ids).last_hidden_state.std()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(str(folder / "tuned"), safe_serialization=True)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama")
    fine_tune(transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)), folder)
    return folder


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("bert")
    fine_tune(transformers.BertModel(transformers.BertConfig(**BERT)), folder, causal=False)
    return folder


def merged(model_class: Any, base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    return merge(model_class.from_pretrained(str(base)), adapter)


def merge(model: Any, adapter: Path) -> dict[str, torch.Tensor]:
    state = peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().state_dict()
    return {k: v.detach() for k, v in state.items()}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def check_round_trip(result: ExtractResult, after: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                     tuned: dict[str, torch.Tensor], rtol: float = 0.01, atol: float = 1e-5) -> None:  # fmt: skip
    """Per module, the merged error equals the predicted one; every other weight is the base's."""
    assert result.modules
    for m in result.modules:
        delta = tuned[m.name].double() - base[m.name].double()
        got = float(torch.linalg.norm(after[m.name].double() - tuned[m.name].double()) / torch.linalg.norm(delta))
        assert got == pytest.approx(m.error, rel=rtol, abs=atol), m.name
        assert m.error == pytest.approx(math.sqrt(max(1 - m.captured, 0.0)), abs=1e-3)  # fp32: rounding is tiny
    adapted = {m.name for m in result.modules} | {m.name.removesuffix(".weight") + ".bias" for m in result.modules}
    for key, value in base.items():
        if key not in adapted and key in after:
            assert torch.equal(after[key], value), key


# ---------------------------------------------------------------------------------------------------- kernels


def test_topk_per_job_k_matches_float64_svd() -> None:
    """Each job gets its own k, in a stacked same-shape batch (GPU code path on the CPU) and one by one."""
    rng = np.random.default_rng(0)
    xs = {f"m{i}": planted_matrix((40, 30), np.geomspace(1, 1e-3, 30), rng) for i in range(3)}
    ks = {"m0": 2, "m1": 7, "m2": 30}
    deltas = {n: Delta(n, (40, 30), torch.from_numpy(x), None, None, "f64", 0.0) for n, x in xs.items()}
    for stacked in (False, True):
        from test_spectrum import job

        executor = LocalExecutor(stacked=stacked, materialize=lambda j, h, *, wide=False: deltas[j.name])
        found = dict((j.name, f) for j, f in run([job(n, (40, 30)) for n in xs], TopK.per_job(ks), executor))
        for name, f in found.items():
            assert isinstance(f, Factors) and len(f.s) == ks[name]
            u, s, _ = scipy.linalg.svd(xs[name], full_matrices=False)
            np.testing.assert_allclose(f.s, s[: ks[name]], rtol=1e-10)
            np.testing.assert_allclose(np.abs(np.sum(f.u * u[:, : ks[name]], axis=0)), 1.0, atol=1e-8)


def test_topk_per_job_is_validated_and_picklable() -> None:
    import pickle

    for bad in ({"a": 0}, {"a": 2.5}, {"a": True}):
        with pytest.raises(OptionsError, match="per-job k"):
            TopK(4, ranks=bad)
    with pytest.raises(OptionsError, match="empty"):
        TopK.per_job({})
    kernel = TopK.per_job({"a": 3, "b": 9})
    assert kernel.k == 9 and kernel.k_of("a") == 3 and kernel.k_of("zzz") == 9
    assert pickle.loads(pickle.dumps(kernel)) == kernel and hash(kernel) == hash(TopK(9))


def test_energy_kernel_dense_and_factored() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20, 12))
    b, a = rng.standard_normal((20, 3)), rng.standard_normal((3, 12))
    dense = Delta("d", (20, 12), torch.from_numpy(x), None, None, "f64", 0.0)
    factored = Delta("f", (20, 12), None, (torch.from_numpy(b), torch.from_numpy(a)), None, "f64", 0.0)
    assert Energy().compute([dense])[0] == pytest.approx(float(np.sum(x * x)), rel=1e-12)
    assert Energy().compute([factored])[0] == pytest.approx(float(np.sum((b @ a) ** 2)), rel=1e-12)


# ---------------------------------------------------------------------------------------------------- planted


def planted_model(tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An nn.Module tree whose 2-D keys are bias-free Linear layers and 1-D keys plain parameters."""
    root = torch.nn.Module()
    for key, value in tensors.items():
        *path, leaf, _ = key.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        if value.ndim == 2:
            node.add_module(leaf, torch.nn.Linear(value.shape[1], value.shape[0], bias=False))
        else:
            node.add_module(leaf, torch.nn.Module())
            getattr(node, leaf).weight = torch.nn.Parameter(torch.zeros_like(value))
    root.load_state_dict(tensors)
    return root


@pytest.mark.parametrize("rank", [8, 3])
def test_planted_round_trip_through_peft(planted_pair: PairFactory, tmp_path: Path, rank: int) -> None:
    """Known spectra (rank8, geometric, power, step): the rank-8 ΔW at r = 8 comes back exactly (error ~0); every
    prediction equals √(1 − E(r)) of a float64 scipy SVD and PEFT's merge reproduces it."""
    base_path, tuned_path, planted = planted_pair()
    result = spectra.extract(base_path, tuned_path, tmp_path / "out", RankRule(rank=rank), CPU, dtype="fp32")
    base, tuned = load_file(str(base_path)), load_file(str(tuned_path))
    assert {m.name for m in result.modules} == set(planted) and all(m.rank == rank for m in result.modules)
    for m in result.modules:
        s = scipy.linalg.svdvals(tuned[m.name].double().numpy() - base[m.name].double().numpy())
        assert m.error == pytest.approx(
            math.sqrt(np.sum(s[rank:] ** 2) / np.sum(s**2)), rel=1e-6, abs=1e-7
        )  # + fp32 rounding
    if rank == 8:
        assert result.modules[[m.name for m in result.modules].index("model.layers.0.mlp.rank8.weight")].error < 1e-5
    model = planted_model(base)
    after = merge(model, tmp_path / "out")
    check_round_trip(result, after, base, tuned)
    norms = {s.name for s in result.left_out if s.reason == "not-representable"}
    assert norms == {f"model.layers.{i}.norm.weight" for i in range(4)}  # norms changed 1.0 → 1.5
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == rank and config["task_type"] is None


# ---------------------------------------------------------------------------------------------------- real models


RULES = {
    "rank": RankRule(rank=4),
    "energy": RankRule(energy=0.8),
    "auto": RankRule(auto=True),
    "budget": RankRule(budget=3000),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_llama_round_trip(llama: Path, tmp_path: Path, rule: str) -> None:
    result = spectra.extract(llama / "base", llama / "tuned", tmp_path / "out", RULES[rule], CPU, dtype="fp32")
    after = merged(transformers.LlamaForCausalLM, llama / "base", tmp_path / "out")
    check_round_trip(result, after, weights(llama / "base"), weights(llama / "tuned"))
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(llama / "base")
    assert "modules_to_save" not in config and not any("embed" in m.name or "lm_head" in m.name for m in result.modules)
    if rule == "budget":
        assert result.params <= 3000
    if rule == "energy":
        assert all(m.captured >= 0.8 * (1 - 1e-6) for m in result.modules)
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), "pt") as f:
        assert len(list(f.keys())) == 2 * len(result.modules)


def test_ranks_from_a_recommended_config(llama: Path, tmp_path: Path) -> None:
    """--from-config: the ranks `spectra recommend` wrote (rank_pattern), as PEFT reads them."""
    analysis = spectra.analyze(llama / "base", llama / "tuned", CPU)
    rec = spectra.recommend(analysis.layers, budget=2500, task_type=None)
    assert rec is not None
    spectra.write_adapter_config(rec, tmp_path / "rec.json")
    rule = RankRule(from_config=str(tmp_path / "rec.json"))
    result = spectra.extract(llama / "base", llama / "tuned", tmp_path / "out", rule, CPU, dtype="fp32")
    assert {m.name: m.rank for m in result.modules} == {k: r for k, r in rec.allocation.items() if r > 0}
    check_round_trip(result, merged(transformers.LlamaForCausalLM, llama / "base", tmp_path / "out"),
                     weights(llama / "base"), weights(llama / "tuned"))  # fmt: skip


def test_llama_embeddings_only_when_asked(llama: Path, tmp_path: Path) -> None:
    result = spectra.extract(llama / "base", llama / "tuned", tmp_path / "out", RankRule(rank=5), CPU,
                             dtype="fp32", include_embeddings=True)  # fmt: skip
    names = {m.name for m in result.modules}
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= names
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.model.embed_tokens.lora_embedding_A" in set(f.keys())
    check_round_trip(result, merged(transformers.LlamaForCausalLM, llama / "base", tmp_path / "out"),
                     weights(llama / "base"), weights(llama / "tuned"))  # fmt: skip


def test_bf16_factors_predict_their_rounding(llama: Path, tmp_path: Path) -> None:
    """bf16 storage adds a rounding term to √(1 − E(r)); the prediction includes it and PEFT's merge agrees."""
    result = spectra.extract(llama / "base", llama / "tuned", tmp_path / "out", RankRule(rank=16), CPU, dtype="bf16")
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118
    after = merged(transformers.LlamaForCausalLM, llama / "base", tmp_path / "out")
    base, tuned = weights(llama / "base"), weights(llama / "tuned")
    for m in result.modules:
        delta = tuned[m.name].double() - base[m.name].double()
        got = float(torch.linalg.norm(after[m.name].double() - tuned[m.name].double()) / torch.linalg.norm(delta))
        assert got == pytest.approx(m.error, rel=0.01)
    assert any(m.error > math.sqrt(max(1 - m.captured, 0)) * 1.0001 for m in result.modules)


def test_bert_bias_changes_are_carried_as_lora_bias(bert: Path, tmp_path: Path) -> None:
    """Every BERT linear has a bias, all changed: lora_bias carries them and the merged biases equal TUNED's."""
    result = spectra.extract(bert / "base", bert / "tuned", tmp_path / "out", RankRule(rank=6), CPU, dtype="fp32")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["lora_bias"] is True and config["task_type"] == "FEATURE_EXTRACTION"
    assert all(m.bias for m in result.modules)
    after = merged(transformers.BertModel, bert / "base", tmp_path / "out")
    base, tuned = weights(bert / "base"), weights(bert / "tuned")
    check_round_trip(result, after, base, tuned)
    for m in result.modules:
        key = m.name.removesuffix(".weight") + ".bias"
        torch.testing.assert_close(after[key], tuned[key], rtol=0, atol=1e-6)
    left = {s.name: s for s in result.left_out}
    assert left["embeddings.LayerNorm.weight"].reason == "not-representable"


def test_bert_biases_and_embeddings_refused_or_dropped(bert: Path, tmp_path: Path) -> None:
    with pytest.raises(SpectraError, match="PEFT carries them only as lora_bias"):
        spectra.extract(bert / "base", bert / "tuned", tmp_path / "a", RankRule(rank=2), CPU, include_embeddings=True)
    assert not (tmp_path / "a").exists()
    result = spectra.extract(bert / "base", bert / "tuned", tmp_path / "b", RankRule(rank=2), CPU,
                             include_embeddings=True, biases="drop")  # fmt: skip
    dropped = [s for s in result.left_out if s.name.endswith("query.bias")]
    assert dropped and all(s.reason == "not-representable" and "dropped" in s.detail for s in dropped)
    assert "lora_bias" not in json.loads((tmp_path / "b" / "adapter_config.json").read_text())


def test_gpt2_conv1d_is_written_for_fan_in_fan_out(tmp_path: Path) -> None:
    """Conv1D stores W as (in, out): the adapter says fan_in_fan_out and PEFT merges the right orientation."""
    torch.manual_seed(2)
    fine_tune(transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)), tmp_path, steps=1)
    result = spectra.extract(tmp_path / "base", tmp_path / "tuned", tmp_path / "out", RankRule(rank=4), CPU,
                             dtype="fp32", targets=["c_attn", "c_proj", "c_fc"])  # fmt: skip
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["lora_bias"] is True
    check_round_trip(result, merged(transformers.GPT2LMHeadModel, tmp_path / "base", tmp_path / "out"),
                     weights(tmp_path / "base"), weights(tmp_path / "tuned"))  # fmt: skip


def test_gpt2_names_without_config_json_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    w = {"h.0.attn.c_proj.weight": torch.from_numpy(rng.standard_normal((16, 16))).float()}
    base = save_checkpoint(w, tmp_path / "base")
    tuned = save_checkpoint({k: v + 0.1 for k, v in w.items()}, tmp_path / "tuned")
    with pytest.raises(spectra.CheckpointError, match=r"config\.json"):
        spectra.extract(base, tuned, tmp_path / "out", RankRule(rank=2), CPU)


# ---------------------------------------------------------------------------------------------------- left out


def edited_pair(tmp_path: Path) -> tuple[Path, Path]:
    """Three 2-D modules: a changes (rank 6), b is unchanged, c changes by a tiny rank-1 update."""
    rng = np.random.default_rng(4)
    base = {n: torch.from_numpy(rng.standard_normal((30, 20))) for n in ("m.a.weight", "m.b.weight", "m.c.weight")}
    tuned = dict(base)
    tuned["m.a.weight"] = base["m.a.weight"] + torch.from_numpy(planted_matrix((30, 20), np.ones(6), rng))
    tuned["m.c.weight"] = base["m.c.weight"] + 1e-3 * torch.from_numpy(planted_matrix((30, 20), np.ones(1), rng))
    return save_checkpoint(base, tmp_path / "base"), save_checkpoint(tuned, tmp_path / "tuned")


def test_unchanged_and_rank_zero_modules_are_left_out_and_listed(tmp_path: Path) -> None:
    base, tuned = edited_pair(tmp_path)
    result = spectra.extract(base, tuned, tmp_path / "out", RankRule(budget=6 * 50), CPU)
    assert [(m.name, m.rank) for m in result.modules] == [("m.a.weight", 6)]
    assert result.modules[0].error < 1e-6 and result.dtype == "fp32"  # float64 inputs: fp32 factors
    assert {(s.name, s.reason) for s in result.left_out} == {("m.b.weight", "unchanged"), ("m.c.weight", "rank-0")}
    assert result.captured == pytest.approx(
        1 - result.dropped_energy / (result.dropped_energy + result.modules[0].energy)
    )
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["base_model.model.m.a.lora_A.weight", "base_model.model.m.a.lora_B.weight"]


def test_exact_low_rank_is_padded_not_refused(tmp_path: Path) -> None:
    """Float64 checkpoints with an exactly rank-6 ΔW at --rank 10: six directions and four zero ones."""
    base, tuned = edited_pair(tmp_path)
    result = spectra.extract(base, tuned, tmp_path / "out", RankRule(rank=10), CPU, targets=["a"])
    (module,) = result.modules
    assert module.rank == 10 and module.padded == 4 and module.error < 1e-6


def test_factors_are_written_as_they_come(llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Streaming: when the engine hands over module i+1, module i is already on disk (no adapter held)."""
    written: list[str] = []
    original = AdapterWriter.write_factors

    def record(self: AdapterWriter, module: str, *args: Any, **kwargs: Any) -> None:
        original(self, module, *args, **kwargs)
        written.append(module)

    seen: list[int] = []

    def progress(items: Iterable[Any]) -> Iterator[Any]:
        for item in items:
            seen.append(len(written))
            yield item

    monkeypatch.setattr(AdapterWriter, "write_factors", record)
    result = spectra.extract(llama / "base", llama / "tuned", tmp_path / "out", RankRule(rank=2), CPU,
                             progress=progress)  # fmt: skip
    n = len(result.modules)
    assert seen[-n:] == list(range(n))  # the second pass: one write per result, before the next arrives


# ---------------------------------------------------------------------------------------------------- bad input


def entries(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def cli(*args: object) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def test_bad_inputs_one_line_exit_1_nothing_written(llama: Path, tmp_path: Path) -> None:
    base, tuned = llama / "base", llama / "tuned"
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    cases = {
        "same checkpoint": [base, base, "-o", tmp_path / "a", "--rank", 4],
        "not empty": [base, tuned, "-o", full, "--rank", 4],
        "no targeted module": [base, tuned, "-o", tmp_path / "b", "--rank", 4, "--target", "nope"],
        "inside an input": [base, tuned, "-o", tuned / "adapter", "--rank", 4],
        "an input": [base, tuned, "-o", tuned, "--rank", 4, "--overwrite"],
        "around an input": [base, tuned, "-o", llama, "--rank", 4, "--overwrite"],
    }
    before = {p: entries(p) for p in (tmp_path, base, tuned, llama, full)}
    for what, args in cases.items():
        result = cli("extract", *args)
        outputs = {"not empty", "inside an input", "an input", "around an input"}  # refused before reading: usage
        assert result.exit_code == (2 if what in outputs else 1), (what, result.output)
        assert result.output.startswith("error: ") and result.output.count("\n") == 1, what
        assert "Traceback" not in result.output
    assert {p: entries(p) for p in before} == before and (full / "keep.txt").read_text() == "mine"


def test_rank_rules_are_usage_errors() -> None:
    with pytest.raises(OptionsError, match="exactly one"):
        RankRule()
    with pytest.raises(OptionsError, match="exactly one"):
        RankRule(rank=4, energy=0.9)
    for bad in ({"rank": 0}, {"rank": True}, {"energy": 0.0}, {"energy": 1.5}, {"energy": math.nan}, {"budget": 0}):
        with pytest.raises(OptionsError):
            RankRule(**bad)  # type: ignore[arg-type]
    assert RankRule.parse("auto") == RankRule(auto=True) and RankRule.parse("12") == RankRule(rank=12)
    with pytest.raises(OptionsError, match="'auto'"):
        RankRule.parse("big")
    for args in ([], ["--rank", "4", "--energy", "0.9"], ["--rank", "x"], ["--energy", "2"]):
        result = cli("extract", "b", "t", "-o", "out", *args)
        assert result.exit_code == 2 and result.output.startswith("error: "), args


def test_nothing_changed_and_adapters_as_inputs(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    w = {"m.a.weight": torch.from_numpy(rng.standard_normal((8, 6)))}
    base, tuned = save_checkpoint(w, tmp_path / "b"), save_checkpoint(w, tmp_path / "t")
    with pytest.raises(MismatchError, match="none of the 1 targeted modules changed"):
        spectra.extract(base, tuned, tmp_path / "out", RankRule(rank=2), CPU)
    assert not (tmp_path / "out").exists() and entries(tmp_path) == ["b", "t"]


def test_an_interrupt_leaves_nothing(llama: Path, tmp_path: Path) -> None:
    def interrupt(items: Iterable[Any]) -> Iterator[Any]:
        yield from items
        raise KeyboardInterrupt

    calls: list[int] = []

    def second_pass(items: Iterable[Any]) -> Iterable[Any]:
        calls.append(1)
        return interrupt(items) if len(calls) == 2 else items

    with pytest.raises(KeyboardInterrupt):
        spectra.extract(llama / "base", llama / "tuned", tmp_path / "out", RankRule(rank=2), CPU, progress=second_pass)
    assert entries(tmp_path) == []


# ---------------------------------------------------------------------------------------------------- CLI, JSON


def test_cli_summary_and_json(llama: Path, tmp_path: Path) -> None:
    result = cli("extract", llama / "base", llama / "tuned", "-o", tmp_path / "out", "--rank", "3", "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    assert "layers.0.self_attn.q_proj" in result.stdout and "predicted error" in result.stdout
    assert "left out, excluded: 2" in result.stdout and "left out, not-representable: 5" in result.stdout
    result = cli("extract", llama / "base", llama / "tuned", "-o", tmp_path / "out", "--energy", "0.7",
                 "--overwrite", "--json", "-")  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["format"] == "spectra.extraction/1" and record["rule"]["energy"] == 0.7
    assert len(record["modules"]) == 14 and record["dtype"] == "fp32"
    assert {"name", "rank", "params", "captured", "error", "frobenius_norm"} <= set(record["modules"][0])
    assert record["params"] == sum(m["params"] for m in record["modules"])
    assert {s["reason"] for s in record["left_out"]} == {"excluded", "not-representable"}
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert record["config"] == written


def test_extraction_json_file(planted_pair: PairFactory, tmp_path: Path) -> None:
    base, tuned, _ = planted_pair()
    result = cli("extract", base, tuned, "-o", tmp_path / "out", "--budget", "2000", "--json", tmp_path / "x.json")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "x.json").read_text())
    assert record["params"] <= 2000 and record["rule"]["budget"] == 2000


def test_plan_is_the_rank_pair_plan(llama: Path) -> None:
    """extract pairs tensors exactly as `rank` does (the same planner): one job per 2-D weight."""
    with open_checkpoint(str(llama / "base")) as b, open_checkpoint(str(llama / "tuned")) as t:
        assert len(plan_pair(b, t, CPU).jobs) == 16


@requires_cuda
@pytest.mark.gpu
def test_cuda_extraction_matches_cpu(llama: Path, tmp_path: Path) -> None:
    """The same ranks and predicted errors on the GPU (stacked TopK with per-job k) as on the CPU; PEFT agrees."""
    rule = RankRule(energy=0.8)
    cpu = spectra.extract(llama / "base", llama / "tuned", tmp_path / "cpu", rule, CPU, dtype="fp32")
    gpu = spectra.extract(llama / "base", llama / "tuned", tmp_path / "gpu", rule, Options(device="cuda"), dtype="fp32")
    assert gpu.device.startswith("cuda")
    for a, b in zip(cpu.modules, gpu.modules, strict=True):
        assert (a.name, a.rank) == (b.name, b.rank) and b.error == pytest.approx(a.error, rel=1e-6, abs=1e-9)
    check_round_trip(gpu, merged(transformers.LlamaForCausalLM, llama / "base", tmp_path / "gpu"),
                     weights(llama / "base"), weights(llama / "tuned"))  # fmt: skip
