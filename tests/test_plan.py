"""Planners and jobs: what plan_pair / plan_many / plan_weights produce, jobs that survive pickling (and materialise
the same in another process), and materialising raw weights and factored jobs."""

from __future__ import annotations

import contextlib
import dataclasses
import pickle
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import save_checkpoint
from spectra import CheckpointError, MismatchError, Options
from spectra.engine.kernels import Values
from spectra.io.checkpoint import open_checkpoint
from spectra.io.tensors import Handles
from spectra.plan.delta import make_delta
from spectra.plan.dense import plan_many, plan_pair, plan_weights
from spectra.plan.jobs import Dense, Factored, Job, Plan
from spectra.plan.noise import rounding_noise_energy
from spectra.records import Delta, Skipped, Spectrum


def materialise(job: Job, wide: bool = False) -> Delta | Skipped:
    with contextlib.closing(Handles()) as handles:
        return make_delta(job, handles, wide=wide)


@pytest.fixture
def trio(tmp_path: Path) -> tuple[Path, list[Path]]:
    """A base and three fine-tunes: two change both matrices differently, the third also adds a tensor."""
    g = torch.Generator().manual_seed(0)
    base = {"layers.0.q.weight": torch.randn(6, 4, generator=g), "layers.1.q.weight": torch.randn(6, 4, generator=g)}
    base["layers.0.norm.weight"] = torch.ones(6)
    tuned = [{k: v + 0.1 * (i + 1) for k, v in base.items()} for i in range(3)]
    tuned[2]["extra.weight"] = torch.randn(3, 3, generator=g)
    return save_checkpoint(base, tmp_path / "base"), [
        save_checkpoint(t, tmp_path / f"t{i}") for i, t in enumerate(tuned)
    ]


def test_plan_pair_names_both_tensors_by_file_and_byte_range(trio: tuple[Path, list[Path]]) -> None:
    base, tuned = trio
    with open_checkpoint(str(base)) as b, open_checkpoint(str(tuned[0])) as t:
        plan = plan_pair(b, t, Options())
        entries_b, entries_t = dict(b.entries), dict(t.entries)
    assert isinstance(plan, Plan) and plan.notes == ()
    assert [j.name for j in plan.jobs] == ["layers.0.q.weight", "layers.1.q.weight"]
    for job in plan.jobs:
        assert isinstance(job.operand, Dense) and job.shape == (6, 4) and job.source == 0 and job.note is None
        assert job.operand.tuned == entries_t[job.name] and job.operand.base == entries_b[job.name]
        assert job.operand.rows == 6 and job.operand.tuned.file == tuned[0]
    assert [(s.name, s.reason) for s in plan.skipped] == [("layers.0.norm.weight", "not-2d")]


def test_plan_many_is_one_pair_plan_per_tuned_input_tagged_by_source(trio: tuple[Path, list[Path]]) -> None:
    base, tuned = trio
    with open_checkpoint(str(base)) as b:
        cks = [open_checkpoint(str(t)) for t in tuned]
        plans = plan_many(b, cks, Options())
        alone = [plan_pair(b, ck, Options()) for ck in cks]
    assert len(plans) == 3
    for source, (plan, single) in enumerate(zip(plans, alone, strict=True)):
        assert {j.source for j in plan.jobs} == {source}
        assert [dataclasses.replace(j, source=0) for j in plan.jobs] == list(single.jobs)
        assert plan.skipped == single.skipped and plan.notes == single.notes
    assert ("extra.weight", "only-in-tuned") in {(s.name, s.reason) for s in plans[2].skipped}


def test_plan_weights_lists_raw_matrices(tmp_path: Path) -> None:
    w = torch.randn(10, 7).bfloat16()
    path = save_checkpoint(
        {"w.weight": w, "zero.weight": torch.zeros(3, 5), "bias": torch.ones(7), "ids": torch.ones(2, 2).long()},
        tmp_path / "w",
    )
    with open_checkpoint(str(path)) as ck:
        every = plan_weights(ck)
        two = plan_weights(ck, ["zero.weight", "w.weight"], source=3)
        with pytest.raises(MismatchError, match="no tensor 'nope'"):
            plan_weights(ck, ["nope"])
    assert [j.name for j in every.jobs] == ["w.weight", "zero.weight"]
    assert {(s.name, s.reason) for s in every.skipped} == {("bias", "not-2d"), ("ids", "not-float")}
    assert [j.name for j in two.jobs] == ["zero.weight", "w.weight"] and {j.source for j in two.jobs} == {3}
    job = two.jobs[1]
    assert isinstance(job.operand, Dense) and job.operand.base is None and job.shape == (10, 7)
    delta = materialise(job)
    assert isinstance(delta, Delta) and delta.values is not None and delta.base_norm is None
    assert torch.equal(delta.values, w.float()) and delta.dtype == "bf16"
    assert delta.noise_energy == pytest.approx(rounding_noise_energy(w, "bf16"), rel=1e-12)
    zero = materialise(two.jobs[0])
    assert isinstance(zero, Skipped) and zero.reason == "unchanged" and zero.detail == "W = 0"


def factored_job(tmp_path: Path, a: torch.Tensor, b: torch.Tensor, transpose: bool) -> Job:
    save_file({"m.lora_A.weight": a, "m.lora_B.weight": b}, str(tmp_path / "adapter_model.safetensors"))
    with open_checkpoint(str(tmp_path / "adapter_model.safetensors")) as ck:
        entries = ck.entries
    shape = (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])
    return Job(
        "m.weight", shape, Factored(entries["m.lora_A.weight"], entries["m.lora_B.weight"], 2.0, transpose, None)
    )


@pytest.mark.parametrize("transpose", [False, True])
def test_factored_job_materialises_oriented_scaled_factors(tmp_path: Path, transpose: bool) -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 9, generator=g), torch.randn(5, 3, generator=g)
    job = factored_job(tmp_path, a, b, transpose)
    delta = materialise(job)
    assert isinstance(delta, Delta) and delta.values is None and delta.factors is not None
    want = 2.0 * b.double() @ a.double()
    got = delta.factors[0] @ delta.factors[1]
    assert got.shape == job.shape and torch.allclose(got, want.mT if transpose else want, rtol=1e-12)
    untrained = factored_job(tmp_path, a, torch.zeros(5, 3), transpose)
    assert isinstance(materialise(untrained), Skipped)
    a[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"adapter tensor 'm\.lora_A\.weight' holds 1 NaN/Inf value"):
        materialise(factored_job(tmp_path, a, b, transpose))


def test_jobs_pickle_to_small_equal_descriptors(trio: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, tuned = trio
    with open_checkpoint(str(base)) as b, open_checkpoint(str(tuned[1])) as t:
        jobs = list(plan_pair(b, t, Options()).jobs)
    jobs.append(factored_job(tmp_path, torch.randn(2, 4), torch.randn(3, 2), True))
    for job in jobs:
        data = pickle.dumps(job)
        again = pickle.loads(data)
        assert again == job and hash(again) == hash(job) and len(data) < 1000  # names files, holds no tensor
        first, second = materialise(job), materialise(again)
        assert isinstance(first, Delta) and isinstance(second, Delta)
        for x, y in zip((first.values, *(first.factors or ())), (second.values, *(second.factors or ())), strict=True):
            assert (x is None and y is None) or torch.equal(x, y)  # type: ignore[arg-type]


def _spectrum_elsewhere(job: Job) -> Spectrum:
    delta = materialise(job)
    assert isinstance(delta, Delta)
    return Values("exact").compute([delta])[0]


@pytest.mark.slow
def test_a_job_materialises_and_computes_in_another_process(trio: tuple[Path, list[Path]]) -> None:
    """What a Ray actor does: receive a pickled job, open the files itself, compute; same σ as here."""
    base, tuned = trio
    with open_checkpoint(str(base)) as b, open_checkpoint(str(tuned[0])) as t:
        jobs = plan_pair(b, t, Options()).jobs
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        remote = list(pool.map(_spectrum_elsewhere, jobs))
    for job, sp in zip(jobs, remote, strict=True):
        assert sp.name == job.name
        np.testing.assert_array_equal(sp.s, _spectrum_elsewhere(job).s)
