"""The resume journal: a run stopped after N matrices computes only the rest, and its analysis equals an
uninterrupted run's; journals of other runs, torn or hostile journals are never trusted."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from spectra import Options, OptionsError, analyze, analyze_many
from spectra.io.store import analysis_to_dict
from spectra.journal import FORMAT, Journal, _decode, _record, journal_path
from spectra.plan.jobs import Dense, Job
from spectra.records import Skipped, Spectrum

N_MATRICES = 10
RANKS = [1 + i % 5 for i in range(N_MATRICES)]  # planted rank of each ΔW; the last matrix is left unchanged


def build_pair(folder: Path, seed: int = 0, bump: float = 1.0) -> tuple[Path, Path]:
    """float64 base/tuned pair: ΔW of matrix i has rank RANKS[i] exactly, except the last (unchanged)."""
    g = torch.Generator().manual_seed(seed)
    base, tuned = {}, {}
    for i, r in enumerate(RANKS):
        name = f"model.layers.{i}.mlp.up_proj.weight"
        w = torch.randn(24, 16, generator=g, dtype=torch.float64)
        delta = (
            bump
            * torch.randn(24, r, generator=g, dtype=torch.float64)
            @ torch.randn(r, 16, generator=g, dtype=torch.float64)
        )
        base[name], tuned[name] = w, w + delta if i < N_MATRICES - 1 else w.clone()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(base, folder / "base.safetensors")
    save_file(tuned, folder / "tuned.safetensors")
    return folder / "base.safetensors", folder / "tuned.safetensors"


class Stop(Exception):
    """Stands for the process dying after some matrices."""


def stop_after(n: int) -> Any:
    def hook(items: Iterable[Any]) -> Iterator[Any]:
        for i, item in enumerate(items):
            if i == n:
                raise Stop
            yield item

    return hook


class Counter:
    """A progress hook that records how many matrices were left to compute."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, items: Any) -> Any:
        self.sizes.append(len(items))
        return items


def comparable(analysis: Any) -> dict[str, Any]:
    data = analysis_to_dict(analysis)
    del data["elapsed_s"], data["created"]  # differ between any two runs
    return data


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return build_pair(tmp_path / "ck")


@pytest.mark.parametrize("stopped_after", [0, 1, 4, N_MATRICES - 1])
def test_a_stopped_run_resumes_with_only_the_rest_and_the_same_result(
    pair: tuple[Path, Path], tmp_path: Path, stopped_after: int
) -> None:
    uninterrupted = analyze(*pair)
    path = journal_path(tmp_path / "out.json")
    with pytest.raises(Stop):
        analyze(*pair, progress=stop_after(stopped_after), journal=Journal(path))
    if stopped_after == 0:
        assert not path.exists()  # a journal without a matrix is removed: nothing is left
    else:
        lines = path.read_text().splitlines()
        assert len(lines) == 1 + stopped_after and json.loads(lines[0])["format"] == FORMAT
    counter, notes = Counter(), []
    journal = Journal(path, notify=notes.append)
    resumed = analyze(*pair, progress=counter, journal=journal)
    assert counter.sizes == [N_MATRICES - stopped_after]  # only the rest is computed
    assert journal.resumed == stopped_after and journal.note is None
    assert (notes != []) == (stopped_after > 0)
    assert comparable(resumed) == comparable(uninterrupted)
    for a, b in zip(resumed.layers, uninterrupted.layers, strict=True):
        assert a.s.tobytes() == b.s.tobytes()
    assert all(m.rank <= r for m, r in zip(resumed.layers, RANKS, strict=False))  # the planted rank bounds it
    assert [s.name for s in resumed.skipped] == [f"model.layers.{N_MATRICES - 1}.mlp.up_proj.weight"]
    assert path.exists()  # the caller removes it once the outputs are written
    journal.remove()
    assert not path.exists()


def test_the_planted_ranks_come_back_from_the_journal(pair: tuple[Path, Path], tmp_path: Path) -> None:
    path = tmp_path / "j"
    analyze(*pair, journal=Journal(path))
    options = Options(threshold=0.999999)
    counter = Counter()
    resumed = analyze(*pair, options, progress=counter, journal=Journal(path))
    assert counter.sizes == [0]  # everything was journaled: threshold changes the metrics, not the spectra
    assert [m.rank for m in resumed.layers] == RANKS[:-1]
    assert comparable(resumed) == comparable(analyze(*pair, options))


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ("precision", "another --precision"),
        ("include", "other tensors"),
        ("inputs", "other input files"),
    ],
)
def test_a_journal_of_another_run_is_ignored_with_a_note(
    pair: tuple[Path, Path], tmp_path: Path, change: str, fragment: str
) -> None:
    path = tmp_path / "j"
    with pytest.raises(Stop):
        analyze(*pair, progress=stop_after(5), journal=Journal(path))
    options, inputs = Options(), pair
    if change == "precision":
        options = Options(precision="exact")
    elif change == "include":
        options = Options(include=r"layers\.[0-8]\.")
    else:
        inputs = build_pair(tmp_path / "ck", seed=0, bump=2.0)  # same names and shapes, other values
    counter, notes = Counter(), []
    journal = Journal(path, notify=notes.append)
    result = analyze(*inputs, options, progress=counter, journal=journal)
    assert journal.resumed == 0 and journal.note is not None and fragment in journal.note
    assert notes == [journal.note] and "\n" not in journal.note
    assert counter.sizes == [len(result.layers) + len(result.skipped) - (change == "include")]
    assert comparable(result) == comparable(analyze(*inputs, options))
    assert len(path.read_text().splitlines()) == 1 + counter.sizes[0]  # replaced by this run's journal


def test_resume_true_needs_a_matching_journal(pair: tuple[Path, Path], tmp_path: Path) -> None:
    path = tmp_path / "j"
    with pytest.raises(OptionsError, match="no journal"):
        analyze(*pair, journal=Journal(path, resume=True))
    assert not path.exists()
    with pytest.raises(Stop):
        analyze(*pair, progress=stop_after(3), journal=Journal(path))
    with pytest.raises(OptionsError, match="another --precision"):
        analyze(*pair, Options(precision="exact"), journal=Journal(path, resume=True))
    counter = Counter()
    analyze(*pair, progress=counter, journal=Journal(path, resume=True))
    assert counter.sizes == [N_MATRICES - 3]


def test_resume_false_starts_afresh(pair: tuple[Path, Path], tmp_path: Path) -> None:
    path = tmp_path / "j"
    with pytest.raises(Stop):
        analyze(*pair, progress=stop_after(3), journal=Journal(path))
    counter = Counter()
    journal = Journal(path, resume=False)
    analyze(*pair, progress=counter, journal=journal)
    assert counter.sizes == [N_MATRICES] and journal.note is None


def test_a_torn_last_line_is_dropped(pair: tuple[Path, Path], tmp_path: Path) -> None:
    path = tmp_path / "j"
    with pytest.raises(Stop):
        analyze(*pair, progress=stop_after(4), journal=Journal(path))
    text = path.read_bytes()
    path.write_bytes(text[: len(text) - 7])  # killed in the middle of writing the 4th record
    counter = Counter()
    resumed = analyze(*pair, progress=counter, journal=Journal(path))
    assert counter.sizes == [N_MATRICES - 3]
    assert comparable(resumed) == comparable(analyze(*pair))
    assert all(json.loads(line) for line in path.read_text().splitlines())  # the torn line is gone


def good_lines(pair: tuple[Path, Path], path: Path, n: int) -> list[str]:
    with pytest.raises(Stop):
        analyze(*pair, progress=stop_after(n), journal=Journal(path))
    return path.read_text().splitlines()


def tampered(line: str, **changes: Any) -> str:
    entry = json.loads(line)
    entry["spectrum"].update(changes)
    return json.dumps(entry)


def retagged(line: str, **changes: Any) -> str:
    return json.dumps({**json.loads(line), **changes})


@pytest.mark.parametrize(
    "bad",
    [
        lambda line: "[" * 100_000 + "]" * 100_000,  # nesting deeper than the parser's recursion limit
        lambda line: "not json",
        lambda line: "null",
        lambda line: tampered(line, s=[1e308 * 10]),  # Infinity
        lambda line: tampered(line, s=[float("nan")]),
        lambda line: tampered(line, s=[1.0] * 1000),  # more values than min(shape)
        lambda line: tampered(line, s="1.0"),
        lambda line: tampered(line, shape=[16, 24]),  # not the planned shape
        lambda line: tampered(line, energy="big"),
        lambda line: tampered(line, energy=True),
        lambda line: tampered(line, name=None),
        lambda line: tampered(line, name="model.layers.0.mlp.up_proj.weight"),  # not the job's own name
        lambda line: retagged(line, source="0"),
        lambda line: retagged(line, source=[0]),
        lambda line: retagged(line, source=True),
        lambda line: retagged(line, name="model.layers.99.mlp.up_proj.weight"),  # no such job
        lambda line: tampered(line, base_norm="x"),
        lambda line: json.dumps({"source": 0, "name": json.loads(line)["name"], "skipped": {"name": 1}}),
    ],
)
def test_a_record_that_does_not_describe_a_planned_job_ends_what_is_trusted(
    pair: tuple[Path, Path], tmp_path: Path, bad: Any
) -> None:
    path = tmp_path / "j"
    lines = good_lines(pair, path, 5)
    path.write_text("\n".join([*lines[:3], bad(lines[3]), lines[4], lines[5]]) + "\n")
    counter = Counter()
    resumed = analyze(*pair, progress=counter, journal=Journal(path))
    assert counter.sizes == [N_MATRICES - 2]  # the two records before the bad line are kept
    assert comparable(resumed) == comparable(analyze(*pair))


@pytest.mark.parametrize("header", ["", "garbage\n", '{"format": "spectra.journal/0"}\n', "[]\n", "[" * 50_000 + "\n"])
def test_a_file_that_is_not_a_journal_is_replaced(pair: tuple[Path, Path], tmp_path: Path, header: str) -> None:
    path = tmp_path / "j"
    path.write_text(header)
    journal = Journal(path)
    analyze(*pair, journal=journal)
    assert journal.resumed == 0 and (journal.note is None) == (header == "")
    assert json.loads(path.read_text().splitlines()[0])["format"] == FORMAT


def test_a_journal_in_use_by_another_run_is_refused(pair: tuple[Path, Path], tmp_path: Path) -> None:
    path = tmp_path / "j"
    entered, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def slow(items: Iterable[Any]) -> Iterator[Any]:
        entered.set()
        release.wait(10)
        yield from items

    def first() -> None:
        try:
            analyze(*pair, progress=slow, journal=Journal(path))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert entered.wait(10)
        with pytest.raises(OptionsError, match="another spectra run"):
            analyze(*pair, journal=Journal(path))
    finally:
        release.set()
        thread.join()
    assert errors == []


def test_many_inputs_resume_per_input(tmp_path: Path) -> None:
    base, tuned_a = build_pair(tmp_path / "a", seed=1)
    _, tuned_b = build_pair(tmp_path / "b", seed=1, bump=0.5)
    path = tmp_path / "j"
    with pytest.raises(Stop):
        analyze_many(base, [tuned_a, tuned_b], progress=stop_after(7), journal=Journal(path))
    counter = Counter()
    resumed = analyze_many(base, [tuned_a, tuned_b], progress=counter, journal=Journal(path))
    assert counter.sizes == [2 * N_MATRICES - 7]
    fresh = analyze_many(base, [tuned_a, tuned_b])
    assert [comparable(a) for a in resumed] == [comparable(a) for a in fresh]


def test_float64_values_round_trip_exactly() -> None:
    rng = np.random.default_rng(0)
    s = np.sort(np.concatenate([rng.standard_normal(40) ** 2 * 10.0 ** rng.integers(-300, 300, 40), [5e-324, 0.0]]))
    s = s[::-1].copy()
    entry = Job("w", (64, 48), Dense(None, None, 64))  # type: ignore[arg-type]  # the operand is not read here
    spectrum = Spectrum("w", (64, 48), s, 0.1 + 0.2, 1 / 3, "bf16", 2.0**-1074, "gram-f64")
    decoded = _decode(json.loads(_record(entry, spectrum)), {(0, "w"): (64, 48)})
    assert decoded is not None
    key, back = decoded
    assert key == (0, "w") and isinstance(back, Spectrum)
    assert back.s.dtype == np.float64 and back.s.tobytes() == s.tobytes()
    assert (back.energy, back.base_norm, back.noise_energy) == (0.1 + 0.2, 1 / 3, 2.0**-1074)
    assert back == spectrum  # every compared field
    skipped = Skipped("w", "unchanged", "ΔW is exactly zero \x1b")
    assert _decode(json.loads(_record(entry, skipped)), {(0, "w"): (64, 48)}) == ((0, "w"), skipped)


def test_every_spectrum_field_is_journaled() -> None:
    """A field added to Spectrum must be journaled too, or a resumed analysis would differ from an uninterrupted one."""
    import dataclasses

    job = Job("w", (4, 3), Dense(None, None, 4))  # type: ignore[arg-type]
    spectrum = Spectrum("w", (4, 3), np.array([2.0, 1.0]), 5.0, None, "f32", 0.0, "svd-f64")
    assert set(json.loads(_record(job, spectrum))["spectrum"]) == {f.name for f in dataclasses.fields(Spectrum)}


def test_the_journal_is_json_lines_never_pickle(pair: tuple[Path, Path], tmp_path: Path) -> None:
    path = tmp_path / "j"
    analyze(*pair, journal=Journal(path))
    lines = path.read_bytes().splitlines()
    assert len(lines) == 1 + N_MATRICES
    assert all(line.isascii() for line in lines)
    header = json.loads(lines[0])["key"]
    assert set(header) == {"version", "kernel", "device", "files", "plan", "jobs"}
    assert sorted(header["files"]) == sorted(str(p.resolve()) for p in pair)
    size, mtime, digest = header["files"][str(pair[0].resolve())]
    assert size == pair[0].stat().st_size and mtime == pair[0].stat().st_mtime_ns and len(digest) == 64
