"""merge_adapter against PEFT's own merge_and_unload on tiny models built here (Llama, GPT-2 Conv1D, BERT), adapters
written by PEFT itself (alpha and rank/alpha patterns, rsLoRA, lora_bias, embeddings, modules_to_save) and by
spectra.extract (merged == base + truncated ΔW, against a float64 SVD); output forms and refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import spectra
from spectra import CheckpointError, MismatchError, Options, RankRule, SpectraError

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

LLAMA = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 2}
LLAMA |= {"num_key_value_heads": 2, "vocab_size": 70}
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2 = {"n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 60, "n_positions": 16}
BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 48}
BERT |= {"vocab_size": 60, "max_position_embeddings": 16}


def save_llama(folder: Path, dtype: torch.dtype = torch.float32, seed: int = 0, **kw: Any) -> Path:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**(LLAMA | kw))).to(dtype)
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def biased(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_llama(tmp_path_factory.mktemp("biased"), seed=1, attention_bias=True, mlp_bias=True)


def trained(model: Any, config: Any, folder: Path, seed: int = 0) -> Path:
    """A PEFT adapter with random non-zero factors (and biases), saved by PEFT."""
    wrapped = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    wrapped.save_pretrained(str(folder), save_embedding_layers=False)
    return folder


def peft_merged(model: Any, adapter: Path) -> dict[str, torch.Tensor]:
    state = peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().state_dict()
    return {k: v.detach().clone() for k, v in state.items()}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file or a model folder (all its shards)."""
    if path.is_file():
        return load_file(str(path))
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out |= load_file(str(file))
    return out


def assert_matches_peft(out: Path, want: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> set[str]:
    """The written tensors equal PEFT's merged state dict (keys, dtypes, shapes as the base); returns the changed."""
    got = tensors(out)
    assert got.keys() == base.keys()
    changed = set()
    for key, tensor in got.items():
        assert tensor.dtype == base[key].dtype and tensor.shape == base[key].shape, key
        torch.testing.assert_close(tensor, want[key].to(tensor.dtype), rtol=2e-6, atol=2e-6)
        if not torch.equal(tensor, base[key]):
            changed.add(key)
    return changed


def no_leftovers(folder: Path, expected: set[str]) -> None:
    assert set(os.listdir(folder)) == expected


# ---------------------------------------------------------------------------------------------------- against PEFT


def test_llama_all_linear_with_patterns(llama: Path, tmp_path: Path) -> None:
    config = peft.LoraConfig(
        r=4,
        lora_alpha=7,
        target_modules=ALL,
        rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 6},
        alpha_pattern={"q_proj": 3.5, "o_proj": 11},
    )
    adapter = trained(transformers.LlamaForCausalLM.from_pretrained(str(llama)), config, tmp_path / "a")
    result = spectra.merge_adapter(llama, adapter, tmp_path / "out")
    want = peft_merged(transformers.LlamaForCausalLM.from_pretrained(str(llama)), adapter)
    changed = assert_matches_peft(tmp_path / "out", want, tensors(llama))
    assert result.path == (tmp_path / "out").resolve() and set(result.merged) == changed
    assert len(result.merged) == 2 * len(ALL) and result.copied == len(tensors(llama)) - len(result.merged)
    assert list(result.merged) == sorted(result.merged, key=spectra.names.natural_key)
    assert (tmp_path / "out" / "config.json").read_bytes() == (llama / "config.json").read_bytes()
    assert (tmp_path / "out" / "generation_config.json").is_file()
    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out"))  # loads as the base does
    ids = torch.arange(10)[None]
    merged = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(str(llama)), str(adapter))
    torch.testing.assert_close(reloaded(ids).logits, merged(ids).logits, rtol=1e-5, atol=1e-5)
    no_leftovers(tmp_path, {"a", "out"})


def test_rslora_and_lora_bias(biased: Path, tmp_path: Path) -> None:
    config = peft.LoraConfig(r=4, lora_alpha=5, use_rslora=True, lora_bias=True, target_modules=["q_proj", "down_proj"])
    adapter = trained(transformers.LlamaForCausalLM.from_pretrained(str(biased)), config, tmp_path / "a")
    result = spectra.merge_adapter(biased, adapter, tmp_path / "out")
    want = peft_merged(transformers.LlamaForCausalLM.from_pretrained(str(biased)), adapter)
    changed = assert_matches_peft(tmp_path / "out", want, tensors(biased))
    assert "model.layers.0.self_attn.q_proj.bias" in changed and "model.layers.1.mlp.down_proj.bias" in changed
    assert set(result.merged) == changed and len(changed) == 4 * 2


def test_embedding_adapter(llama: Path, tmp_path: Path) -> None:
    config = peft.LoraConfig(
        r=4, lora_alpha=6, target_modules=["embed_tokens", "o_proj"], rank_pattern={"embed_tokens": 3}
    )
    adapter = trained(transformers.LlamaForCausalLM.from_pretrained(str(llama)), config, tmp_path / "a")
    assert any("lora_embedding_A" in k for k in load_file(str(adapter / "adapter_model.safetensors")))
    result = spectra.merge_adapter(llama, adapter, tmp_path / "out")
    want = peft_merged(transformers.LlamaForCausalLM.from_pretrained(str(llama)), adapter)
    changed = assert_matches_peft(tmp_path / "out", want, tensors(llama))
    assert "model.embed_tokens.weight" in changed and set(result.merged) == changed and len(changed) == 3


def test_gpt2_conv1d_fan_in_fan_out(tmp_path: Path) -> None:
    torch.manual_seed(2)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)).save_pretrained(str(tmp_path / "base"))
    load = lambda: transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "base"))  # noqa: E731
    config = peft.LoraConfig(r=3, lora_alpha=9, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    adapter = trained(load(), config, tmp_path / "a")
    result = spectra.merge_adapter(tmp_path / "base", adapter, tmp_path / "out")
    changed = assert_matches_peft(tmp_path / "out", peft_merged(load(), adapter), tensors(tmp_path / "base"))
    assert set(result.merged) == changed and "transformer.h.0.attn.c_attn.weight" in changed


def test_bert_with_modules_to_save(tmp_path: Path) -> None:
    torch.manual_seed(3)
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(**BERT, num_labels=3))
    bert.save_pretrained(str(tmp_path / "base"))
    load = lambda: transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "base"))  # noqa: E731
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["query", "value"], modules_to_save=["classifier"])
    adapter = trained(load(), config, tmp_path / "a")
    result = spectra.merge_adapter(tmp_path / "base", adapter, tmp_path / "out")
    changed = assert_matches_peft(tmp_path / "out", peft_merged(load(), adapter), tensors(tmp_path / "base"))
    assert {"classifier.weight", "classifier.bias"} <= changed
    assert set(result.merged) == changed - {"classifier.weight", "classifier.bias"}


# ---------------------------------------------------------------------------------------------------- extract


def test_an_extracted_adapter_merges_to_base_plus_truncated_delta(llama: Path, tmp_path: Path) -> None:
    base = tensors(llama)
    g = torch.Generator().manual_seed(4)
    tuned = {k: v + 0.05 * torch.randn(v.shape, generator=g) if "proj" in k else v for k, v in base.items()}
    transformers.LlamaForCausalLM.from_pretrained(str(llama)).save_pretrained(str(tmp_path / "tuned"))
    save_file(tuned, str(tmp_path / "tuned" / "model.safetensors"), metadata={"format": "pt"})
    spectra.extract(llama, tmp_path / "tuned", tmp_path / "a", RankRule(rank=3), Options(device="cpu"), dtype="fp32")
    result = spectra.merge_adapter(llama, tmp_path / "a", tmp_path / "out")
    got = tensors(tmp_path / "out")
    assert len(result.merged) == 2 * len(ALL)
    for name in result.merged:
        delta = tuned[name].double().numpy() - base[name].double().numpy()
        u, s, vt = np.linalg.svd(delta, full_matrices=False)
        want = base[name].double().numpy() + (u[:, :3] * s[:3]) @ vt[:3]
        np.testing.assert_allclose(got[name].double().numpy(), want, rtol=0, atol=2e-6)
    assert all(torch.equal(got[k], base[k]) for k in base if k not in result.merged)


# ---------------------------------------------------------------------------------------------------- forms


def test_bf16_stays_bf16_and_dtype_overrides(tmp_path: Path) -> None:
    base = save_llama(tmp_path / "base", torch.bfloat16)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    adapter = trained(transformers.LlamaForCausalLM.from_pretrained(str(base)), config, tmp_path / "a")
    result = spectra.merge_adapter(base, adapter, tmp_path / "out")
    stored, got, factors = (
        tensors(base),
        tensors(tmp_path / "out"),
        load_file(str(adapter / "adapter_model.safetensors")),
    )
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    for name in result.merged:  # W + 2·B@A in float32, rounded once to bf16
        key = "base_model.model." + name.removesuffix(".weight")
        delta = factors[f"{key}.lora_B.weight"].float() @ factors[f"{key}.lora_A.weight"].float()
        assert torch.equal(got[name], (stored[name].float() + 2 * delta).to(torch.bfloat16))
    spectra.merge_adapter(base, adapter, tmp_path / "fp32", dtype="fp32")
    wide = tensors(tmp_path / "fp32")
    assert {t.dtype for t in wide.values()} == {torch.float32}
    assert all(torch.equal(wide[k].to(torch.bfloat16), got[k]) for k in got if k not in result.merged)


def test_sharded_folder_gives_the_same_shards_and_index(llama: Path, tmp_path: Path) -> None:
    model = transformers.LlamaForCausalLM.from_pretrained(str(llama))
    model.save_pretrained(str(tmp_path / "base"), max_shard_size="60KB")
    shards = sorted(p.name for p in (tmp_path / "base").glob("*.safetensors"))
    assert len(shards) > 2
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=ALL)
    adapter = trained(model, config, tmp_path / "a")
    (tmp_path / "base" / "tokenizer.json").write_text("{}")
    (tmp_path / "base" / "pytorch_model.bin").write_bytes(b"stale")  # weights of another format: not copied
    (tmp_path / "base" / "sub").mkdir()
    (tmp_path / "outside").write_text("secret")
    (tmp_path / "base" / "link.txt").symlink_to(tmp_path / "outside")
    spectra.merge_adapter(tmp_path / "base", adapter, tmp_path / "out")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    index = "model.safetensors.index.json"
    assert (out / index).read_bytes() == (tmp_path / "base" / index).read_bytes()
    assert set(os.listdir(out)) == {*shards, index, "config.json", "generation_config.json", "tokenizer.json"}
    for shard in shards:  # each shard holds the base shard's keys, dtypes, shapes and metadata
        with safe_open(str(tmp_path / "base" / shard), "pt") as a, safe_open(str(out / shard), "pt") as b:
            assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys())
    want = peft_merged(transformers.LlamaForCausalLM.from_pretrained(str(llama)), adapter)
    assert_matches_peft(out, want, tensors(tmp_path / "base"))
    transformers.LlamaForCausalLM.from_pretrained(str(out))


def test_a_single_file_gives_a_file(llama: Path, tmp_path: Path) -> None:
    base = tensors(llama)
    base["counter"] = torch.arange(5, dtype=torch.int64)
    save_file(base, str(tmp_path / "base.safetensors"), metadata={"note": "mine"})
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    adapter = trained(transformers.LlamaForCausalLM.from_pretrained(str(llama)), config, tmp_path / "a")
    result = spectra.merge_adapter(tmp_path / "base.safetensors", adapter, tmp_path / "merged.safetensors")
    assert result.path == (tmp_path / "merged.safetensors").resolve() and result.path.is_file()
    with safe_open(str(result.path), "pt") as f:
        assert f.metadata() == {"note": "mine"}
    got = load_file(str(result.path))
    assert got.keys() == base.keys() and torch.equal(got["counter"], base["counter"])
    assert len(result.merged) == 2
    no_leftovers(tmp_path, {"base.safetensors", "a", "merged.safetensors"})


# ---------------------------------------------------------------------------------------------------- refusals


def test_refusals_leave_nothing_behind(llama: Path, tmp_path: Path) -> None:
    load = lambda: transformers.LlamaForCausalLM.from_pretrained(str(llama))  # noqa: E731
    dora = trained(load(), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), tmp_path / "dora")
    with pytest.raises(CheckpointError, match="DoRA") as error:
        spectra.merge_adapter(llama, dora, tmp_path / "out")
    assert "\n" not in str(error.value)
    plain = trained(load(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), tmp_path / "plain")
    partial = {k: v for k, v in tensors(llama).items() if k != "model.layers.1.self_attn.v_proj.weight"}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(MismatchError, match=r"adapter_model\.safetensors: module .model\.layers\.1\.self_attn\.v_proj"):
        spectra.merge_adapter(tmp_path / "partial.safetensors", plain, tmp_path / "out.safetensors")
    with pytest.raises(MismatchError, match=r"adapter_model\.safetensors"):  # shapes of another model
        other = save_llama(tmp_path / "other", hidden_size=32)
        spectra.merge_adapter(other, plain, tmp_path / "out")
    save_file(tensors(llama), str(tmp_path / "full.safetensors"))
    for source, out in [(llama, llama), (llama, llama / "merged"), (llama, plain / "x"), (llama, tmp_path)]:
        with pytest.raises(SpectraError, match="apart from the inputs"):  # an input, inside or around one
            spectra.merge_adapter(source, plain, out)
    for out in (tmp_path / "full.safetensors", plain / "m.safetensors"):
        with pytest.raises(SpectraError, match="apart from the inputs"):
            spectra.merge_adapter(tmp_path / "full.safetensors", plain, out)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(SpectraError, match="not empty"):
        spectra.merge_adapter(llama, plain, tmp_path / "taken")
    (tmp_path / "taken.safetensors").write_text("x")
    with pytest.raises(SpectraError, match="exists"):
        spectra.merge_adapter(tmp_path / "full.safetensors", plain, tmp_path / "taken.safetensors")
    with pytest.raises(spectra.OptionsError, match="dtype"):
        spectra.merge_adapter(llama, plain, tmp_path / "out", dtype="int8")
    no_leftovers(
        tmp_path, {"dora", "plain", "partial.safetensors", "full.safetensors", "other", "taken", "taken.safetensors"}
    )
    assert sorted(os.listdir(plain)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert (tmp_path / "taken" / "x").read_text() == "x" and (tmp_path / "taken.safetensors").read_text() == "x"
    spectra.merge_adapter(llama, plain, tmp_path / "taken", overwrite=True)
    assert "x" not in os.listdir(tmp_path / "taken")
    assert not list(llama.glob(".*")) and json.loads((plain / "adapter_config.json").read_text())["r"] == 2


def test_dtype_updates_the_index_and_progress_sees_every_tensor(llama: Path, tmp_path: Path) -> None:
    model = transformers.LlamaForCausalLM.from_pretrained(str(llama))
    model.save_pretrained(str(tmp_path / "base"), max_shard_size="60KB")
    adapter = trained(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]), tmp_path / "a")
    seen: list[str] = []

    def progress(items: Any) -> Any:
        for item in items:
            seen.append(item)
            yield item

    spectra.merge_adapter(tmp_path / "base", adapter, tmp_path / "out", dtype="bf16", progress=progress)
    got = tensors(tmp_path / "out")
    assert sorted(seen) == sorted(got) and {t.dtype for t in got.values()} == {torch.bfloat16}
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in got.values())
    assert (
        index["weight_map"]
        == json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())["weight_map"]
    )
    transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out"))


def test_a_saved_copy_of_the_embedding_is_what_peft_merges_onto(llama: Path, tmp_path: Path) -> None:
    """save_embedding_layers (PEFT's default when an embedding is targeted) stores the layer's weight; PEFT loads that
    copy over the base's, then merges: so does merge_adapter (the copy is perturbed here to tell them apart)."""
    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["embed_tokens", "q_proj"])
    wrapped = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(str(llama)), config)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape) * 0.3)
    wrapped.save_pretrained(str(tmp_path / "a"))
    file = tmp_path / "a" / "adapter_model.safetensors"
    stored = load_file(str(file))
    copy = "base_model.model.model.embed_tokens.base_layer.weight"
    assert copy in stored
    stored[copy] = stored[copy] + 1.0
    save_file(stored, str(file), metadata={"format": "pt"})
    result = spectra.merge_adapter(llama, tmp_path / "a", tmp_path / "out")
    want = peft_merged(transformers.LlamaForCausalLM.from_pretrained(str(llama)), tmp_path / "a")
    changed = assert_matches_peft(tmp_path / "out", want, tensors(llama))
    assert "model.embed_tokens.weight" in result.merged and set(result.merged) == changed


def test_module_names_with_a_prefix_the_base_lacks(llama: Path, tmp_path: Path) -> None:
    """A bare model's checkpoint ("layers.0...") takes an adapter of the causal-LM model ("model.layers.0...")."""
    base = {k.removeprefix("model."): v for k, v in tensors(llama).items() if k.startswith("model.")}
    save_file(base, str(tmp_path / "bare.safetensors"))
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    adapter = trained(transformers.LlamaForCausalLM.from_pretrained(str(llama)), config, tmp_path / "a")
    result = spectra.merge_adapter(tmp_path / "bare.safetensors", adapter, tmp_path / "out.safetensors")
    want = peft_merged(transformers.LlamaForCausalLM.from_pretrained(str(llama)), adapter)
    got = load_file(str(result.path))
    assert got.keys() == base.keys() and result.merged[0] == "layers.0.self_attn.q_proj.weight"
    for key, tensor in got.items():
        torch.testing.assert_close(tensor, want["model." + key], rtol=2e-6, atol=2e-6)


def test_other_adapters_and_a_failure_midway_leave_nothing(llama: Path, tmp_path: Path) -> None:
    load = lambda: transformers.LlamaForCausalLM.from_pretrained(str(llama))  # noqa: E731
    peft.get_peft_model(load(), peft.IA3Config(target_modules=["v_proj"], feedforward_modules=[])).save_pretrained(
        str(tmp_path / "ia3")
    )
    with pytest.raises(CheckpointError, match="IA3"):
        spectra.merge_adapter(llama, tmp_path / "ia3", tmp_path / "out")
    tokens = peft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[1, 2])
    trained(load(), tokens, tmp_path / "tokens")
    with pytest.raises(CheckpointError, match="trainable token"):
        spectra.merge_adapter(llama, tmp_path / "tokens", tmp_path / "out")
    plain = trained(load(), peft.LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "plain")

    def failing(items: Any) -> Any:
        for i, item in enumerate(items):
            if i == 5:
                raise KeyboardInterrupt
            yield item

    for out in (tmp_path / "out", tmp_path / "deep" / "er" / "out"):
        with pytest.raises(KeyboardInterrupt):
            spectra.merge_adapter(llama, plain, out, progress=failing)
    no_leftovers(tmp_path, {"ia3", "tokens", "plain"})
