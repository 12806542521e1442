"""The notebook API: short repr, _repr_html_, to_pandas, Options as keywords, in-memory inputs, progress=True."""

from __future__ import annotations

import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from builders import KINDS, adapter_analysis, make_analysis
from conftest import PairFactory, planted_matrix
from spectra import Analysis, CheckpointError, Options, OptionsError, analyze, save_analysis

# ---------------------------------------------------------------- repr, HTML, frames


def test_repr_is_short_and_says_the_headline() -> None:
    a = make_analysis(n_layers=4)
    text = repr(a)
    o = a.summary.overall
    assert len(text) < 300 and "\n" not in text
    assert f"{o.n} matrices" in text and f"median rank@0.9 {o.median_rank:g} (max {o.max_rank}" in text
    assert "no LoRA recommendation" in text and "runs/tuned.safetensors − runs/base & co/base.safetensors" in text
    assert "singular" not in repr(a.layers[0]) and len(repr(a.layers[0])) < 1000  # σ arrays are not in reprs


class Tags(HTMLParser):
    def __init__(self, html: str) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.rows = 0
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack.append(tag)
        self.rows += tag == "tr"

    def handle_endtag(self, tag: str) -> None:
        assert self.stack.pop() == tag


def test_repr_html_parses_with_a_row_per_kind() -> None:
    names = {(0, "q_proj"): "model.layers.0.<q>&.weight"}
    a = make_analysis(names=names)
    html = a._repr_html_()
    page = Tags(html)
    assert not page.stack and page.rows == 1 + len(KINDS) + 1  # header, kinds, "all"
    assert "<q>" not in html and "median rank@90%" in html and "<table>" in html


def test_to_pandas_one_row_per_matrix_with_the_json_scalars() -> None:
    pd = pytest.importorskip("pandas")
    a = make_analysis(n_layers=3)
    df = a.to_pandas()
    assert isinstance(df, pd.DataFrame) and len(df) == len(a.layers)
    assert list(df["name"]) == [lm.name for lm in a.layers] and list(df["rank"]) == [lm.rank for lm in a.layers]
    for column in ("rows", "cols", "kind", "layer", "random_rank", "noisy", "captured_4", "captured_16", "dtype"):
        assert column in df.columns, column
    assert "s" not in df.columns and "singular_values" not in df.columns
    np.testing.assert_allclose(df["captured_8"], [lm.captured[8] for lm in a.layers])
    kinds = a.to_pandas("kind")
    assert list(kinds["key"]) == [*KINDS, "all"] and list(kinds["n"]) == [3, 3, 3, 9]
    layers = a.to_pandas("layer")
    assert list(layers["key"]) == ["0", "1", "2"] and "median_rank" in layers.columns
    with pytest.raises(ValueError, match="by must be"):
        a.to_pandas("matrices")


def test_to_pandas_without_pandas_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ModuleNotFoundError, match=r"spectra-lm\[pandas\]"):
        make_analysis().to_pandas()


def test_task_type_and_base_model_name_come_from_the_configs() -> None:
    a = make_analysis()
    assert a.task_type is None and a.base_model_name is None
    assert adapter_analysis().task_type is None


# ---------------------------------------------------------------- analyze(...)


def test_options_fields_as_keywords(planted_pair: PairFactory) -> None:
    base, tuned, _ = planted_pair()
    by_keyword = analyze(base, tuned, threshold=0.5, device="cpu", lora_ranks=[4, 8])
    typed = analyze(str(base), str(tuned), Options(threshold=0.5, device="cpu", lora_ranks=(4, 8)))
    assert by_keyword.options == typed.options and [lm.rank for lm in by_keyword.layers] == [
        lm.rank for lm in typed.layers
    ]
    assert analyze(base, tuned, Options(threshold=0.9), threshold=0.5).options.threshold == 0.5
    with pytest.raises(TypeError, match="unknown option 'treshold'"):
        analyze(base, tuned, treshold=0.5)
    with pytest.raises(OptionsError, match="threshold must be in"):
        analyze(base, tuned, threshold=1.5)


def test_paths_are_accepted_and_saved_as_text(planted_pair: PairFactory, tmp_path: Path) -> None:
    base, tuned, _ = planted_pair()
    a = analyze(Path(base), Path(tuned))
    assert a.base == str(base) and a.tuned == str(tuned)
    assert save_analysis(a, tmp_path / "a.json").is_file()


def same_spectra(a: Analysis, b: Analysis, relative: bool = True) -> None:
    assert [lm.name for lm in a.layers] == [lm.name for lm in b.layers]
    for x, y in zip(a.layers, b.layers, strict=True):
        assert x.rank == y.rank and x.shape == y.shape
        np.testing.assert_allclose(x.s, y.s, rtol=1e-5, atol=1e-9 * y.s[0])
        if relative:
            assert x.relative_change == pytest.approx(y.relative_change)


def test_state_dicts_give_the_analysis_of_the_saved_files(planted_pair: PairFactory) -> None:
    """The oracle: the same tensors analysed from files."""
    base, tuned, _ = planted_pair(dtype=torch.bfloat16)
    from_files = analyze(base, tuned, device="cpu")
    in_memory = analyze(load_file(str(base)), load_file(str(tuned)), device="cpu")
    same_spectra(in_memory, from_files)
    assert {s.name: s.reason for s in in_memory.skipped} == {s.name: s.reason for s in from_files.skipped}
    assert [lm.noise_fraction for lm in in_memory.layers] == pytest.approx(
        [lm.noise_fraction for lm in from_files.layers]
    )
    assert in_memory.tuned.startswith("<in-memory state dict") and in_memory.tuned_info.format == "state-dict"
    assert in_memory.tuned_info.n_tensors == len(load_file(str(tuned)))


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(40, 48, bias=False)
        self.down = torch.nn.Linear(48, 40)


def test_a_module_right_after_training() -> None:
    torch.manual_seed(0)
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    with torch.no_grad():  # a planted rank-3 update of `up`; `down` untouched
        model.up.weight += torch.from_numpy(planted_matrix((48, 40), np.array([3.0, 2.0, 1.0]), rng)).float()
    a = analyze(before, model, threshold=0.99, progress=lambda xs: xs)
    assert [lm.name for lm in a.layers] == ["up.weight"] and a.layers[0].rank == 3
    assert {s.name: s.reason for s in a.skipped} == {"down.weight": "unchanged", "down.bias": "not-2d"}
    assert a.tuned == "<in-memory Tiny>" and a.tuned_info.format == "module"
    assert torch.equal(model.state_dict()["down.weight"], before["down.weight"])  # nothing was modified


def test_mixing_a_path_and_a_module_is_refused(planted_pair: PairFactory) -> None:
    base, _, _ = planted_pair()
    with pytest.raises(CheckpointError, match="mixing a path with an in-memory model"):
        analyze(base, Tiny())
    with pytest.raises(CheckpointError, match="a BASE is needed"):
        analyze(None, Tiny())
    with pytest.raises(CheckpointError, match="maps names to tensors"):
        analyze({"w": [1, 2]}, {"w": torch.ones(2, 2)})


def test_progress_true_uses_tqdm(planted_pair: PairFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tqdm")
    base, tuned, _ = planted_pair()
    assert len(analyze(base, tuned, progress=True).layers) == 4
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(OptionsError, match="pip install tqdm"):
        analyze(base, tuned, progress=True)


@pytest.mark.slow  # imports transformers and peft
def test_a_peft_model_gives_the_analysis_of_its_saved_adapter(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    lora = LoraConfig(r=6, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(LlamaForCausalLM(config), lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    in_memory = analyze(None, model)
    model.save_pretrained(tmp_path / "adapter")
    same_spectra(in_memory, analyze(None, tmp_path / "adapter"), relative=False)  # the file has no base
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        delta = (q.lora_B["default"].weight @ q.lora_A["default"].weight) * q.scaling["default"]
        relative = float(delta.norm() / q.base_layer.weight.norm())
    assert in_memory.layers[0].relative_change == pytest.approx(relative, rel=1e-5)  # the model holds its base
    assert all(len(lm.s) == 6 for lm in in_memory.layers) and in_memory.tuned_info.format == "peft-model"
    assert in_memory.task_type == "CAUSAL_LM" and in_memory.recommendation is not None
    assert in_memory.recommendation.config["task_type"] == "CAUSAL_LM"
