"""AdapterWriter round trips through PEFT itself: factors written with known values load with
PeftModel.from_pretrained, and merge_and_unload gives W + scale·B@A for every module (rank/alpha patterns, rsLoRA,
embeddings, GPT-2's Conv1D, lora_bias, bf16). Plus atomicity, refusal of non-empty outputs, streaming, and the
task type inferred from the base's config.json that get_peft_model accepts.

Tiny random-init transformers models (no download), saved with save_pretrained(safe_serialization=True).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from spectra import OptionsError, SpectraError
from spectra.names import module_kinds
from spectra.peft.config import build_adapter_config, resized_config
from spectra.peft.layout import adapter_key
from spectra.peft.read import read_lora_settings
from spectra.peft.task import infer_task_type
from spectra.peft.write import AdapterWriter, TensorSpec, lora_layout

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
LLAMA |= {"num_key_value_heads": 1, "vocab_size": 60}
BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 48}
BERT |= {"vocab_size": 60, "max_position_embeddings": 16}


def save_base(model: Any, folder: Path) -> dict[str, torch.Tensor]:
    model.save_pretrained(str(folder), safe_serialization=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama")
    return folder, save_base(transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)), folder)


def extract(
    base: Path,
    sd: dict[str, torch.Tensor],
    ranks: dict[str, int],
    out: Path,
    *,
    rslora: bool = False,
    alphas: dict[str, float] | None = None,
    dtype: torch.dtype = torch.float32,
    bias: bool = False,
    transpose: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]]:
    """Write random factors for `ranks` (checkpoint key -> r) the way extract will; module -> (B, A, scale, bias)."""
    weights = [k for k, v in sd.items() if v.ndim == 2 and k.endswith(".weight")]
    kinds = {k: kind for k, (kind, _) in module_kinds(weights).items()}
    task = infer_task_type(base)
    config, _ = build_adapter_config(
        kinds, ranks, rslora=rslora, task_type=task, base_model=str(base), alphas=alphas, extra=extra
    )
    settings = {"r": config["r"]}  # the config decides each module's (r, alpha): read it back like PEFT would
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(config))
    read = read_lora_settings(out)
    (out / "adapter_config.json").unlink()
    g = torch.Generator().manual_seed(sum(ranks.values()))
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]] = {}
    layout: list[TensorSpec] = []
    for key, r in ranks.items():
        if r == 0:
            continue
        module, shape = key.removesuffix(".weight"), tuple(sd[key].shape)
        embedding = "embed" in module or "word_embeddings" in module
        layout += lora_layout(module, shape, r, dtype, embedding=embedding, transpose=transpose, bias=bias)
        b, a = torch.randn(shape[0], r, generator=g), torch.randn(r, shape[1], generator=g)
        vector = torch.randn(shape[1] if transpose else shape[0], generator=g) if bias else None
        factors[module] = (b, a, read.scale(module), vector)
        assert read.rank_and_alpha(module)[0] == r and settings["r"] >= 1
    with AdapterWriter(out, config, layout, overwrite=True) as writer:
        for module, (b, a, _, vector) in reversed(factors.items()):  # any order
            writer.write_factors(module, b, a, transpose=transpose, bias=vector)
    return factors


def merged(model: Any, folder: Path) -> dict[str, torch.Tensor]:
    return {
        k: v.detach()
        for k, v in peft.PeftModel.from_pretrained(model, str(folder)).merge_and_unload().state_dict().items()
    }


def check_merge(
    after: dict[str, torch.Tensor],
    before: dict[str, torch.Tensor],
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]],
    rtol: float = 1e-5,
) -> None:
    """Every adapted weight is W + scale·B@A (biases b + scale·bias); every other weight is unchanged."""
    for module, (b, a, scale, vector) in factors.items():
        delta = scale * (b.double() @ a.double())
        got = after[f"{module}.weight"].double() - before[f"{module}.weight"].double()
        assert torch.allclose(got, delta, rtol=rtol, atol=rtol * float(delta.abs().max())), module
        if vector is not None:
            got_bias = after[f"{module}.bias"].double() - before[f"{module}.bias"].double()
            assert torch.allclose(got_bias, scale * vector.double(), rtol=rtol, atol=1e-6), module
    untouched = set(before) - {f"{m}.weight" for m in factors} - {f"{m}.bias" for m in factors}
    assert all(torch.equal(after[k], before[k]) for k in untouched if k in after)


def llama_ranks(sd: dict[str, torch.Tensor]) -> dict[str, int]:
    ranks = {}
    for i, key in enumerate(k for k, v in sd.items() if v.ndim == 2):
        adapted = any(s in key for s in ("q_proj", "v_proj", "down_proj", "gate_proj", "embed_tokens"))
        ranks[key] = 1 + i % 4 if adapted else 0
    return ranks


@pytest.mark.parametrize("rslora", [False, True])
def test_llama_round_trip_patterns_embedding(
    llama: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, rslora: bool
) -> None:
    """Mixed ranks (rank_pattern), per-module alphas (alpha_pattern), rank-0 modules, embed_tokens; rsLoRA."""
    base, sd = llama
    ranks = llama_ranks(sd)
    alphas = {k.removesuffix(".weight"): 0.5 + (i % 7) for i, k in enumerate(ranks)}
    factors = extract(base, sd, ranks, tmp_path / "out", rslora=rslora, alphas=alphas)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["alpha_pattern"] and config["task_type"] == "CAUSAL_LM"
    assert "model.embed_tokens" in factors and sorted(os.listdir(tmp_path)) == ["out"]
    for module, (_, _, scale, _) in factors.items():
        r = ranks[f"{module}.weight"]
        alpha = alphas[module]
        assert scale == pytest.approx(alpha / math.sqrt(r) if rslora else alpha / r)
    check_merge(merged(transformers.LlamaForCausalLM.from_pretrained(str(base)), tmp_path / "out"), sd, factors)


def test_file_layout_matches_peft(llama: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    """Keys, shapes and orientation as PEFT's own save_pretrained writes them; safe_open reads every tensor."""
    base, sd = llama
    ranks = {"model.layers.0.self_attn.q_proj.weight": 3, "model.embed_tokens.weight": 2}
    factors = extract(base, sd, ranks, tmp_path / "ours")
    model = transformers.LlamaForCausalLM.from_pretrained(str(base))
    theirs = peft.get_peft_model(model, peft.LoraConfig(r=3, target_modules=["q_proj"], layers_to_transform=[0]))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    with safe_open(str(tmp_path / "theirs" / "adapter_model.safetensors"), "pt") as f:
        peft_shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
    with safe_open(str(tmp_path / "ours" / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        ours = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert {k: list(v.shape) for k, v in ours.items() if k.startswith(q)} == peft_shapes
    b, a, _, _ = factors["model.embed_tokens"]  # ΔW (vocab, hidden) = scale·b@a; PEFT stores Bᵀ as A, Aᵀ as B
    assert torch.equal(ours["base_model.model.model.embed_tokens.lora_embedding_A"], b.T)
    assert torch.equal(ours["base_model.model.model.embed_tokens.lora_embedding_B"], a.T)
    assert torch.equal(ours[f"{q}.lora_A.weight"], factors["model.layers.0.self_attn.q_proj"][1])


def test_bert_lora_bias_and_task_type(tmp_path: Path) -> None:
    """lora_bias: lora_B.bias merges as b + scale·bias; the BERT base's config.json gives FEATURE_EXTRACTION."""
    torch.manual_seed(1)
    sd = save_base(transformers.BertModel(transformers.BertConfig(**BERT)), tmp_path / "bert")
    assert infer_task_type(tmp_path / "bert") == "FEATURE_EXTRACTION"
    ranks = {k: 2 for k in sd if k.endswith(("query.weight", "value.weight", "output.dense.weight"))}
    ranks |= {k: 0 for k in sd if k.endswith("key.weight")}
    factors = extract(tmp_path / "bert", sd, ranks, tmp_path / "out", bias=True, extra={"lora_bias": True})
    assert all(v is not None for *_, v in factors.values())
    check_merge(merged(transformers.BertModel.from_pretrained(str(tmp_path / "bert")), tmp_path / "out"), sd, factors)


def test_gpt2_conv1d_fan_in_fan_out(tmp_path: Path) -> None:
    """Conv1D stores W as (in, out): factors given in that orientation are written transposed, as PEFT merges."""
    torch.manual_seed(2)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=60, n_positions=16)
    sd = save_base(transformers.GPT2LMHeadModel(config), tmp_path / "gpt2")
    ranks = {k: 1 + i % 3 for i, k in enumerate(k for k in sd if k.endswith(("c_attn.weight", "c_fc.weight")))}
    factors = extract(tmp_path / "gpt2", sd, ranks, tmp_path / "out", transpose=True, extra={"fan_in_fan_out": True})
    after = merged(transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "gpt2")), tmp_path / "out")
    check_merge(after, sd, factors)


def test_bf16_and_fp16(llama: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    base, sd = llama
    ranks = {"model.layers.1.mlp.down_proj.weight": 4, "model.layers.0.self_attn.v_proj.weight": 2}
    factors = extract(base, sd, ranks, tmp_path / "bf16", dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "bf16" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118
    rounded = {m: (b.bfloat16().float(), a.bfloat16().float(), s, v) for m, (b, a, s, v) in factors.items()}
    check_merge(merged(transformers.LlamaForCausalLM.from_pretrained(str(base)), tmp_path / "bf16"), sd, rounded)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}
    layout = lora_layout("model.layers.0.self_attn.q_proj", (32, 32), 2, torch.float16)
    with (
        pytest.raises(SpectraError, match=r"not finite in torch\.float16"),
        AdapterWriter(tmp_path / "f16", config, layout) as w,
    ):
        w.write_factors("model.layers.0.self_attn.q_proj", torch.full((32, 2), 1e5), torch.ones(2, 32))
    assert sorted(os.listdir(tmp_path)) == ["bf16"]  # nothing left of the failed fp16 adapter


# ---------------------------------------------------------------- atomicity, refusal, streaming

Q = "model.layers.0.self_attn.q_proj"
CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def small_layout(n: int = 3, shape: tuple[int, int] = (16, 8)) -> list[TensorSpec]:
    return [s for i in range(n) for s in lora_layout(f"model.layers.{i}.self_attn.q_proj", shape, 4)]


def fill(writer: AdapterWriter, layout: list[TensorSpec], value: float = 1.0) -> None:
    for spec in layout:
        writer.write(spec.key, torch.full(spec.shape, value))


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_exception_mid_write_leaves_nothing(tmp_path: Path, error: type[BaseException]) -> None:
    layout = small_layout()
    with pytest.raises(error), AdapterWriter(tmp_path / "out", CONFIG, layout) as writer:
        writer.write(layout[0].key, torch.ones(layout[0].shape))
        assert len(os.listdir(tmp_path)) == 1 and not (tmp_path / "out").exists()  # only the hidden temp folder
        raise error("interrupted")
    assert os.listdir(tmp_path) == []


def test_incomplete_or_wrong_writes(tmp_path: Path) -> None:
    layout = small_layout()
    with pytest.raises(ValueError, match="never written"), AdapterWriter(tmp_path / "out", CONFIG, layout) as writer:
        writer.write(layout[0].key, torch.ones(layout[0].shape))
    assert os.listdir(tmp_path) == []
    writer = AdapterWriter(tmp_path / "out", CONFIG, layout)
    with pytest.raises(ValueError, match="shape"):
        writer.write(layout[0].key, torch.ones(3, 3))
    with pytest.raises(ValueError, match="not in the layout"):
        writer.write("base_model.model.x.lora_A.weight", torch.ones(4, 8))
    writer.write(layout[0].key, torch.ones(layout[0].shape))
    with pytest.raises(ValueError, match="written already"):
        writer.write(layout[0].key, torch.ones(layout[0].shape))
    writer.abort()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("config", "layout", "match"),
    [
        (CONFIG, lora_layout("model.layers.0.mlp.down_proj", (8, 8), 4), "the config does not adapt it"),
        ({**CONFIG, "exclude_modules": [Q]}, lora_layout(Q, (8, 8), 4), "the config does not adapt it"),
        ({**CONFIG, "modules_to_save": ["q_proj"]}, lora_layout(Q, (8, 8), 4), "the config does not adapt it"),
        (CONFIG, lora_layout(Q, (8, 8), 3), "rank 3, but the config gives"),
        ({**CONFIG, "rank_pattern": {"q_proj": 2}}, lora_layout(Q, (8, 8), 4), "config gives .* r=2"),
        (CONFIG, [TensorSpec("base_model.model.q_proj.weight", (4, 4))], "not a LoRA tensor"),
        (CONFIG, [*lora_layout(Q, (8, 8), 4)] * 2, "names a tensor twice"),
        (CONFIG, [TensorSpec(adapter_key(Q, "lora_A"), (4, 8), torch.int8)], "dtype"),
    ],
)
def test_layouts_the_config_does_not_describe(tmp_path: Path, config: dict[str, Any], layout: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AdapterWriter(tmp_path / "out", config, layout)
    assert os.listdir(tmp_path) == []


def test_refuses_non_empty_output_and_overwrites_atomically(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()  # an empty folder is fine
    layout = small_layout()
    with AdapterWriter(out, CONFIG, layout) as writer:
        fill(writer, layout, 1.0)
    with pytest.raises(OptionsError, match=r"exists and is not empty.*overwrite"):
        AdapterWriter(out, CONFIG, layout)
    (out / "README.md").write_text("old")
    with AdapterWriter(out, CONFIG, layout, overwrite=True) as writer:
        fill(writer, layout, 2.0)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]  # the old folder is gone
    assert os.listdir(tmp_path) == ["out"]  # no temp or old folder left beside it
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert all(bool((f.get_tensor(s.key) == 2.0).all()) for s in layout)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SpectraError, match="not a folder"):
        AdapterWriter(tmp_path / "file", CONFIG, layout, overwrite=True)


def test_overwrite_without_atomic_exchange(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where renameat2(RENAME_EXCHANGE) is missing: old folder moved aside, new one renamed in, old one removed."""
    import spectra.peft.write

    monkeypatch.setattr(spectra.peft.write, "exchange", lambda a, b: False)
    layout = small_layout()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with AdapterWriter(tmp_path / "out", CONFIG, layout, overwrite=True) as writer:
        fill(writer, layout)
    assert os.listdir(tmp_path) == ["out"]
    assert sorted(os.listdir(tmp_path / "out")) == ["adapter_config.json", "adapter_model.safetensors"]


def test_output_filled_meanwhile_is_refused_at_commit(tmp_path: Path) -> None:
    layout = small_layout()
    with pytest.raises(OptionsError), AdapterWriter(tmp_path / "out", CONFIG, layout) as writer:
        fill(writer, layout)
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "other").write_text("someone else's")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["other"]


def test_write_streams_to_disk_and_keeps_no_tensor(tmp_path: Path) -> None:
    """Each tensor is on disk when write() returns and the writer holds no reference to it: 64 tensors of 256 KiB
    (16 MiB in all) pass through one at a time."""
    layout = small_layout(32, (256, 128))
    writer = AdapterWriter(tmp_path / "out", CONFIG, layout)
    (tmp := next(tmp_path.iterdir()))
    file = tmp / "adapter_model.safetensors"
    n_header = int.from_bytes(file.read_bytes()[:8], "little")
    header = json.loads(file.read_bytes()[8 : 8 + n_header])
    with open(file, "rb") as fh:
        for i, spec in enumerate(reversed(layout)):
            tensor = torch.full(spec.shape, float(i + 1))
            ref = weakref.ref(tensor)
            writer.write(spec.key, tensor)
            del tensor
            assert ref() is None  # not kept by the writer
            start = 8 + n_header + header[spec.key]["data_offsets"][0]
            assert os.pread(fh.fileno(), 4, start) == torch.tensor([float(i + 1)]).numpy().tobytes()
    path = writer.commit()
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        assert float(f.get_tensor(layout[0].key)[0, 0]) == len(layout)


@pytest.mark.slow
def test_peak_memory_stays_at_one_tensor(tmp_path: Path) -> None:
    """256 MiB of factors written in 4 MiB tensors: the process's peak RSS grows by far less than the adapter."""
    code = f"""
import resource, torch
from spectra.peft.write import AdapterWriter, lora_layout
layout = [s for i in range(32) for s in lora_layout(f"model.layers.{{i}}.self_attn.q_proj", (2048, 2048), 512)]
torch.ones(512, 2048).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with AdapterWriter({str(tmp_path / "out")!r}, {CONFIG | {"r": 512}!r}, layout) as w:
    for spec in layout:
        w.write(spec.key, torch.ones(spec.shape))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    grown = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert grown < 64, f"peak RSS grew by {grown} MiB writing 256 MiB"
    assert (tmp_path / "out" / "adapter_model.safetensors").stat().st_size > 256 * 2**20


# ---------------------------------------------------------------- resize-style round trip and task types


def test_resized_config_round_trip(llama: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    """A PEFT-saved adapter's raw config resized (one module dropped), new factors written: PEFT merges them."""
    base, sd = llama
    model = transformers.LlamaForCausalLM.from_pretrained(str(base))
    peft.get_peft_model(
        model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
    ).save_pretrained(str(tmp_path / "user"))
    settings = read_lora_settings(tmp_path / "user")
    modules = [k.removesuffix(".weight") for k in sd if k.endswith(("q_proj.weight", "v_proj.weight"))]
    ranks = {m: (0 if i == 0 else 1 + i) for i, m in enumerate(modules)}
    config, _ = resized_config(settings.raw, ranks)
    assert config["lora_dropout"] == 0.1 and config["exclude_modules"] == [modules[0]]
    layout = [s for m in modules[1:] for s in lora_layout(m, tuple(sd[f"{m}.weight"].shape), ranks[m])]
    g = torch.Generator().manual_seed(5)
    factors = {}
    with AdapterWriter(tmp_path / "resized", config, layout) as writer:
        for m in modules[1:]:
            shape = sd[f"{m}.weight"].shape
            b, a = torch.randn(shape[0], ranks[m], generator=g), torch.randn(ranks[m], shape[1], generator=g)
            writer.write_factors(m, b, a)
            factors[m] = (b, a, 2.0, None)  # resized_config keeps the scale α/r = 2
    check_merge(merged(transformers.LlamaForCausalLM.from_pretrained(str(base)), tmp_path / "resized"), sd, factors)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "CAUSAL_LM"),
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "CAUSAL_LM"),
        (
            {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "is_encoder_decoder": True},
            "SEQ_2_SEQ_LM",
        ),
        ({"architectures": ["BartForConditionalGeneration"], "model_type": "bart"}, "SEQ_2_SEQ_LM"),
        ({"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava"}, "CAUSAL_LM"),
        ({"architectures": ["BertForSequenceClassification"]}, "SEQ_CLS"),
        ({"architectures": ["RobertaForTokenClassification"]}, "TOKEN_CLS"),
        ({"architectures": ["BertForQuestionAnswering"]}, "QUESTION_ANS"),
        ({"architectures": ["BertModel"], "model_type": "bert"}, "FEATURE_EXTRACTION"),
        ({"architectures": ["T5EncoderModel"], "model_type": "t5"}, "FEATURE_EXTRACTION"),
        ({"architectures": ["T5Model"], "model_type": "t5"}, None),
        ({"architectures": ["BertForMaskedLM"]}, None),
        ({"model_type": "llama"}, None),
        ({"architectures": "LlamaForCausalLM"}, None),
        ({}, None),
    ],
)
def test_infer_task_type_rules(config: dict[str, Any], expected: str | None) -> None:
    assert infer_task_type(config) == expected
    assert expected is None or expected in list(peft.TaskType)


def test_infer_task_type_files(tmp_path: Path) -> None:
    assert infer_task_type(tmp_path) is None  # no config.json
    (tmp_path / "config.json").write_text("[" * 100_000)
    assert infer_task_type(tmp_path) is None
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"]}))
    for source in (tmp_path, tmp_path / "config.json", tmp_path / "model.safetensors", str(tmp_path)):
        assert infer_task_type(source) == "CAUSAL_LM"


def tiny_t5() -> Any:
    return transformers.T5ForConditionalGeneration(
        transformers.T5Config(d_model=32, d_ff=48, num_layers=1, num_heads=2, d_kv=16, vocab_size=60)
    )


@pytest.mark.parametrize(
    ("build", "targets"),
    [
        (lambda: transformers.BertModel(transformers.BertConfig(**BERT)), ("query", "value")),
        (lambda: transformers.BertForSequenceClassification(transformers.BertConfig(**BERT)), ("query", "value")),
        (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)), ("q_proj", "v_proj")),
        (tiny_t5, ("q", "v")),
    ],
    ids=["bert", "bert-seq-cls", "llama", "t5"],
)
def test_inferred_task_type_is_accepted_by_get_peft_model(tmp_path: Path, build: Any, targets: tuple[str, ...]) -> None:
    """The task type inferred from the saved base makes a config PEFT's get_peft_model accepts (CAUSAL_LM on BERT
    raised AttributeError), and the wrapped model runs."""
    model = build()
    model.save_pretrained(str(tmp_path / "base"), safe_serialization=True)
    task = infer_task_type(tmp_path / "base")
    weights = [n for n, p in model.named_parameters() if p.ndim == 2]
    kinds = {n: kind for n, (kind, _) in module_kinds(weights).items()}
    ranks = {n: 2 if n.removesuffix(".weight").rsplit(".", 1)[-1] in targets else 0 for n in weights}
    config, _ = build_adapter_config(kinds, ranks, rslora=False, task_type=task, base_model=None)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    wrapped = peft.get_peft_model(model, peft.LoraConfig.from_pretrained(str(tmp_path / "adapter")))
    ids = torch.tensor([[1, 2, 3]])
    wrapped(input_ids=ids, decoder_input_ids=ids) if task == "SEQ_2_SEQ_LM" else wrapped(input_ids=ids)
    assert sum(1 for m in wrapped.modules() if isinstance(m, peft.tuners.lora.LoraLayer)) == sum(ranks.values()) // 2
