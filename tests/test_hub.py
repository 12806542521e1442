"""Hub ids resolved from a fake local Hugging Face cache (models--org--name/refs, snapshots, blobs) in tmp_path.

HF_HUB_CACHE / HF_HOME are set with monkeypatch after huggingface_hub was imported: spectra reads them at call
time. Nothing touches the network: download=True is exercised with snapshot_download replaced by a fake.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import PairFactory
from spectra import CheckpointError, Options, analyze
from spectra.io.checkpoint import open_checkpoint
from spectra.io.hub import parse_hub_id, resolve_hub_id

hub = pytest.importorskip("huggingface_hub")


def cache_repo(cache: Path, repo: str, files: dict[str, Path], ref: str = "main", seed: str = "") -> str:
    """Lay out `files` (name in repo -> source file) as huggingface_hub does; return the commit hash."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    commit = hashlib.sha1(f"{repo}{ref}{seed}".encode()).hexdigest()
    snapshot = folder / "snapshots" / commit
    for name, source in files.items():
        data = source.read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).symlink_to(blob)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / ref).write_text(commit)
    return commit


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    where = tmp_path / "hf-cache"
    where.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(where))
    return where


def test_parse_hub_id() -> None:
    assert parse_hub_id("meta-llama/Llama-2-7b-hf") == ("meta-llama/Llama-2-7b-hf", None)
    assert parse_hub_id("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_hub_id("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    for not_an_id in ("name", "./org/name", "/abs/path", "a/b/c", "org/name.safetensors@", "org/../x", "org/a--b"):
        assert parse_hub_id(not_an_id) is None, not_an_id


def test_hub_ids_resolve_from_the_local_cache(planted_pair: PairFactory, cache: Path) -> None:
    base, tuned, spectra = planted_pair(layout="shards")
    cache_repo(cache, "org/base", {p.name: p for p in base.iterdir()})
    commit = cache_repo(cache, "org/tuned", {p.name: p for p in tuned.iterdir()})
    by_path = analyze(str(base), str(tuned), Options(precision="exact"))
    for tuned_id in ("org/tuned", f"org/tuned@{commit}", "org/tuned@main"):
        by_id = analyze("org/base", tuned_id, Options(precision="exact"))
        assert by_id.base == "org/base" and by_id.tuned == tuned_id  # as given
        assert by_id.tuned_info.format == "sharded"
        assert [m.name for m in by_id.layers] == list(spectra)
        for a, b in zip(by_id.layers, by_path.layers, strict=True):
            np.testing.assert_array_equal(a.s, b.s)


def test_revision_picks_the_snapshot(planted_pair: PairFactory, cache: Path) -> None:
    base, tuned, _ = planted_pair(layout="folder")
    cache_repo(cache, "org/model", {"model.safetensors": base / "model.safetensors"})
    cache_repo(cache, "org/model", {"model.safetensors": tuned / "model.safetensors"}, ref="finetuned", seed="x")
    folder = resolve_hub_id("org/model@finetuned")
    assert folder.parent.name == "snapshots"
    assert (folder / "model.safetensors").read_bytes() == (tuned / "model.safetensors").read_bytes()
    assert analyze("org/model", "org/model@finetuned").layers


def test_hf_home_is_honoured(planted_pair: PairFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, _, _ = planted_pair(layout="folder")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    cache_repo(tmp_path / "home" / "hub", "org/base", {"model.safetensors": base / "model.safetensors"})
    with open_checkpoint("org/base") as ck:
        assert ck.path == "org/base" and ck.location.is_relative_to(tmp_path / "home" / "hub")


def test_missing_id_says_how_to_fetch_it(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub, "snapshot_download", _no_network(hub.snapshot_download))
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint("org/missing@v2")
    message = str(exc.value)
    assert message.startswith("org/missing@v2: ") and "not in the local Hugging Face cache" in message
    assert "hf download org/missing --revision v2" in message and "--download" in message and str(cache) in message


def test_a_local_path_wins_over_a_hub_id(
    planted_pair: PairFactory, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, _, _ = planted_pair(layout="folder")
    shutil.copytree(base, tmp_path / "org" / "base")
    monkeypatch.chdir(tmp_path)
    with open_checkpoint("org/base") as ck:  # nothing is cached: found on disk
        assert ck.location == Path("org/base") and ck.format == "folder"


def test_non_hub_paths_keep_the_plain_message(cache: Path) -> None:
    with pytest.raises(CheckpointError, match=r"^no/such/file\.safetensors: no such file or folder$"):
        open_checkpoint("no/such/file.safetensors")


def test_without_huggingface_hub_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(CheckpointError, match=r"org/name: no such file or folder; .*pip install 'spectra-lm\[hub\]'"):
        open_checkpoint("org/name")


def test_download_fetches_layout_then_weights_never_pickles(
    planted_pair: PairFactory, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """download=True: first the small layout files, then exactly the shards the index names, at the same commit."""
    _, tuned, _ = planted_pair(layout="shards")
    calls: list[dict[str, Any]] = []
    commit = "c" * 40

    def fake_snapshot_download(repo_id: str, **kw: Any) -> str:
        calls.append({"repo_id": repo_id, **kw})
        assert not kw["local_files_only"] and kw["cache_dir"] == str(cache)
        folder = cache / "models--org--tuned" / "snapshots" / commit
        folder.mkdir(parents=True, exist_ok=True)
        for source in tuned.iterdir():
            if any(Path(source.name).match(p) for p in kw["allow_patterns"]):
                shutil.copy(source, folder / source.name)
        return str(folder)

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    with open_checkpoint("org/tuned@main", download=True) as ck:
        assert ck.format == "sharded" and len(ck.entries) == 8
    assert [c["revision"] for c in calls] == ["main", commit]
    assert "model.safetensors.index.json" in calls[0]["allow_patterns"]
    assert sorted(calls[1]["allow_patterns"]) == sorted(p.name for p in tuned.iterdir())
    assert not any(p.endswith((".bin", ".pt")) for c in calls for p in c["allow_patterns"])


def test_download_errors_become_checkpoint_errors(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(repo_id: str, **kw: Any) -> str:
        raise hub.errors.LocalEntryNotFoundError("Cannot find ... set 'HF_HUB_OFFLINE=0'")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    expected = r"^org/base: .* the download failed: Cannot find .*HF_HUB_OFFLINE"
    with pytest.raises(CheckpointError, match=expected) as exc:
        analyze("org/base", "org/tuned", Options(download=True))
    assert "download=True" not in str(exc.value)


def _no_network(real: Any) -> Any:
    def guarded(*args: Any, **kw: Any) -> Any:
        assert kw["local_files_only"] is True, "spectra tried to reach the hub without download=True"
        return real(*args, **kw)

    return guarded


def test_a_cached_adapter_resolves_like_a_folder(tmp_path: Path, cache: Path) -> None:
    """A hub id whose snapshot is a PEFT adapter: ΔW = (α/r)·B@A read from the cache, named by the base's key."""
    import json

    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    w, a, b = torch.randn(12, 10, generator=g), torch.randn(2, 10, generator=g), torch.randn(12, 2, generator=g)
    save_file({"model.proj.weight": w}, str(tmp_path / "model.safetensors"))
    save_file(
        {"base_model.model.model.proj.lora_A.weight": a, "base_model.model.model.proj.lora_B.weight": b},
        str(tmp_path / "adapter_model.safetensors"),
    )
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 6}))
    cache_repo(cache, "org/base", {"model.safetensors": tmp_path / "model.safetensors"})
    cache_repo(cache, "org/adapter", {n: tmp_path / n for n in ("adapter_model.safetensors", "adapter_config.json")})
    (layer,) = analyze("org/base", "org/adapter", Options(precision="exact")).layers
    expected = np.linalg.svd(3.0 * (b.double() @ a.double()).numpy(), compute_uv=False)[:2]
    assert layer.name == "model.proj.weight" and layer.method == "factored-f64"
    np.testing.assert_allclose(layer.s, expected, rtol=1e-12)
    assert layer.relative_change == pytest.approx(np.sqrt(np.sum(expected**2)) / float(torch.linalg.norm(w.double())))


def _downloading_from(tuned_files: dict[str, bytes], cache: Path, calls: list[list[str]]) -> Any:
    """A fake snapshot_download serving `tuned_files` (name -> bytes), recording the allow_patterns of each call."""
    commit = "d" * 40

    def fake_snapshot_download(repo_id: str, **kw: Any) -> str:
        calls.append(list(kw["allow_patterns"]))
        folder = cache / "models--org--tuned" / "snapshots" / commit
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in tuned_files.items():
            if any(Path(name).match(p) for p in kw["allow_patterns"]):
                (folder / name).write_bytes(data)
        return str(folder)

    return fake_snapshot_download


def test_download_matches_shard_names_literally(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard named `*.safetensors` or `[x].safetensors` must fetch that file, not every file the glob matches."""
    import json

    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2, 2)}, str(tmp_path / "s.safetensors"))
    shard = (tmp_path / "s.safetensors").read_bytes()
    index = json.dumps({"weight_map": {"w": "*.safetensors", "v": "[x].safetensors"}}).encode()
    files = {"model.safetensors.index.json": index, "*.safetensors": shard, "[x].safetensors": shard}
    files["other.safetensors"] = shard
    calls: list[list[str]] = []
    monkeypatch.setattr(hub, "snapshot_download", _downloading_from(files, cache, calls))
    with pytest.raises(CheckpointError):  # both shards hold "w": refused as ambiguous, after a literal download
        open_checkpoint("org/tuned", download=True)
    assert calls[1] == ["model.safetensors.index.json", "[*].safetensors", "[[]x].safetensors"]


@pytest.mark.parametrize(
    ("shard", "fragment"),
    [
        ("../../../x.safetensors", "outside the folder"),
        ("pytorch_model.bin", "pickle"),
        ("/abs.safetensors", "absolute"),
    ],
)
def test_download_refuses_an_index_naming_hostile_shards(
    cache: Path, monkeypatch: pytest.MonkeyPatch, shard: str, fragment: str
) -> None:
    import json

    index = json.dumps({"weight_map": {"w": shard}}).encode()
    calls: list[list[str]] = []
    monkeypatch.setattr(
        hub, "snapshot_download", _downloading_from({"model.safetensors.index.json": index}, cache, calls)
    )
    with pytest.raises(CheckpointError, match=f"weight_map entry 'w' names shard .*{fragment}") as exc:
        open_checkpoint("org/tuned", download=True)
    assert len(calls) == 1 and "\n" not in str(exc.value)  # refused before any weight is fetched


def test_hub_messages_escape_control_characters(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub, "snapshot_download", _no_network(hub.snapshot_download))
    with pytest.raises(CheckpointError) as exc:
        open_checkpoint("org/name@\x1b[2Jrev")
    message = str(exc.value)
    assert "\x1b" not in message and "\\x1b[2Jrev" in message and len(message.splitlines()) == 1


def test_resolve_hub_id_refuses_a_non_id_without_assert() -> None:
    with pytest.raises(CheckpointError, match="not a hub id"):
        resolve_hub_id("../not/an/id")
