"""The engine through its public seams: run() with fake kernels and executors, the Executor protocol, and the local
executor's ordering, Skipped pass-through, memory ledger (results included), errors and shutdown."""

from __future__ import annotations

import contextlib
import pickle
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from test_spectrum import dense, job

from conftest import PairFactory
from spectra import Options, OptionsError
from spectra.engine.executor import Executor, run, schedule_key
from spectra.engine.kernels import Kernel, R, TopK, Values
from spectra.engine.local import LocalExecutor
from spectra.io.checkpoint import open_checkpoint
from spectra.io.tensors import Handles
from spectra.plan.delta import make_delta
from spectra.plan.dense import plan_pair
from spectra.plan.jobs import Job
from spectra.records import Delta, Resources, Skipped


@dataclass(frozen=True)
class Echo:
    """A kernel whose result for a matrix is (its name, the number of matrices in its call, a payload of
    `payload` bytes): ordering and batching are visible, the bytes it holds are chosen."""

    payload: int = 8

    @property
    def wide(self) -> bool:
        return False

    def compute(self, deltas: Sequence[Delta], threads: int | None = None) -> list[tuple[str, int, np.ndarray]]:
        return [(d.name, len(deltas), np.zeros(self.payload, dtype=np.uint8)) for d in deltas]

    def result_nbytes(self, shape: tuple[int, int]) -> int:
        return self.payload


class Serial:
    """The smallest executor that satisfies the protocol, the way a remote worker would: every job and the kernel
    cross a pickle boundary, the job is materialised with a handle cache of the worker's own."""

    def __init__(self) -> None:
        self.received: list[Job] = []

    def run(self, jobs: Sequence[Job], kernel: Kernel[R]) -> Iterator[tuple[Job, R | Skipped]]:
        self.received = list(jobs)
        remote_kernel: Kernel[R] = pickle.loads(pickle.dumps(kernel))
        with contextlib.closing(Handles()) as handles:
            for sent in jobs:
                remote = pickle.loads(pickle.dumps(sent))
                delta = make_delta(remote, handles, wide=remote_kernel.wide)
                yield sent, delta if isinstance(delta, Skipped) else remote_kernel.compute([delta])[0]


def materialize_from(deltas: dict[str, Delta | Skipped]) -> Any:
    def materialize(job: Job, handles: Handles, *, wide: bool = False) -> Delta | Skipped:
        return deltas[job.name]

    return materialize


def test_run_orders_jobs_and_returns_each_result_with_its_job() -> None:
    """run() hands the executor its jobs in schedule order (shape, name, input) and passes (job, result) on."""
    shapes = {"b.2": (4, 3), "b.10": (4, 3), "a": (5, 2), "c": (4, 3)}
    jobs = [Job(n, sh, job(n, sh).operand, source=src) for src in (1, 0) for n, sh in shapes.items()]
    deltas: dict[str, Delta | Skipped] = {n: dense(n, np.ones(sh)) for n, sh in shapes.items()}
    serial = FakeExecutor(materialize_from(deltas))
    got = list(run(jobs, Echo(), serial))
    assert serial.received == sorted(jobs, key=schedule_key)
    assert [(j.name, j.source) for j in serial.received] == [
        ("b.2", 0), ("b.2", 1), ("b.10", 0), ("b.10", 1), ("c", 0), ("c", 1), ("a", 0), ("a", 1)
    ]  # fmt: skip
    assert {(j.name, j.source) for j, _ in got} == {(j.name, j.source) for j in jobs}
    assert all(result[0] == j.name for j, result in got)  # type: ignore[index]


class FakeExecutor:
    """Runs jobs in reverse order (executors may return results in any order), on a stand-in materialiser."""

    def __init__(self, materialize: Any) -> None:
        self.materialize, self.received = materialize, []  # type: ignore[var-annotated]

    def run(self, jobs: Sequence[Job], kernel: Kernel[R]) -> Iterator[tuple[Job, R | Skipped]]:
        self.received = list(jobs)
        for j in reversed(jobs):
            delta = self.materialize(j, Handles())
            yield j, delta if isinstance(delta, Skipped) else kernel.compute([delta])[0]


def test_a_protocol_executor_gives_what_the_local_one_gives(planted_pair: PairFactory) -> None:
    """Jobs and kernel survive pickling and materialise anywhere: Serial (pickles everything) == LocalExecutor."""
    base, tuned, _ = planted_pair()
    with open_checkpoint(str(base)) as b, open_checkpoint(str(tuned)) as t:
        plan = plan_pair(b, t, Options())
    executors: list[Executor] = [Serial(), LocalExecutor(Resources("cpu", threads=2))]
    for kernel in (Values("exact"), TopK(5)):
        remote, local = ({j: r for j, r in run(plan.jobs, kernel, e)} for e in executors)
        assert remote.keys() == local.keys() == set(plan.jobs)
        for j in plan.jobs:
            a, c = remote[j], local[j]
            assert not isinstance(a, Skipped) and not isinstance(c, Skipped)
            assert a.name == c.name == j.name
            np.testing.assert_array_equal(a.s, c.s)


@pytest.mark.parametrize("stacked", [False, True])
def test_unchanged_matrices_pass_through_as_skipped_in_order(stacked: bool) -> None:
    names = ["m0", "zero1", "m2", "m3", "zero4"]
    deltas: dict[str, Delta | Skipped] = {
        n: Skipped(n, "unchanged", "ΔW = 0") if n.startswith("zero") else dense(n, np.eye(6) * (i + 1))
        for i, n in enumerate(names)
    }
    jobs = [job(n, (6, 6)) for n in names]
    executor = LocalExecutor(Resources("cpu", threads=2), stacked=stacked, materialize=materialize_from(deltas))
    got = list(executor.run(jobs, Echo()))
    assert [j for j, _ in got] == jobs
    for j, result in got:
        if j.name.startswith("zero"):
            assert isinstance(result, Skipped) and result.name == j.name and result.reason == "unchanged"
        else:
            assert result[0] == j.name  # type: ignore[index]


@dataclass(frozen=True)
class Slow(Echo):
    """Echo that takes 50 ms per call: the executor's threads always get to run ahead while a matrix computes."""

    def compute(self, deltas: Sequence[Delta], threads: int | None = None) -> list[tuple[str, int, np.ndarray]]:
        time.sleep(0.05)
        return super().compute(deltas, threads)


def test_results_count_in_the_ledger() -> None:
    """Small results: the workers take 2 matrices each and the reader reads on (all 6 read by the first result).
    Results larger than the budget: the reader stops once a result is reserved, so when the first result arrives at
    most the first matrix and the one read before its reservation exist (without results in the ledger: 3)."""

    def built_at_the_first_result(payload: int) -> list[str]:
        built: list[str] = []

        def materialize(j: Job, handles: Handles, *, wide: bool = False) -> Delta | Skipped:
            built.append(j.name)
            return dense(j.name, np.ones((8, 8)))  # 256 B

        jobs = [job(f"m{i}", (8, 8)) for i in range(6)]
        executor = LocalExecutor(Resources("cpu", threads=2, batch_bytes=20_000), materialize=materialize)
        with contextlib.closing(executor.run(jobs, Slow(payload))) as stream:
            assert next(stream)[0] == jobs[0]
            seen = list(built)
            assert [j for j, _ in stream] == jobs[1:] and built == [j.name for j in jobs]
        return seen

    assert len(built_at_the_first_result(8)) == 6
    assert len(built_at_the_first_result(25_000)) <= 2


@pytest.mark.parametrize("stacked", [False, True])
def test_kernel_errors_reach_the_caller(stacked: bool) -> None:
    @dataclass(frozen=True)
    class Broken(Echo):
        def compute(self, deltas: Sequence[Delta], threads: int | None = None) -> list[tuple[str, int, np.ndarray]]:
            raise ZeroDivisionError("a bug in a kernel")

    deltas: dict[str, Delta | Skipped] = {"m": dense("m", np.eye(3))}
    executor = LocalExecutor(stacked=stacked, materialize=materialize_from(deltas))
    with pytest.raises(ZeroDivisionError, match="a bug in a kernel"):
        list(run([job("m", (3, 3))], Broken(), executor))


@pytest.mark.parametrize("stacked", [False, True])
def test_stopping_early_stops_the_reader_and_the_workers(stacked: bool) -> None:
    deltas: dict[str, Delta | Skipped] = {f"m{i}": dense(f"m{i}", np.eye(5)) for i in range(20)}
    executor = LocalExecutor(Resources("cpu", threads=2), stacked=stacked, materialize=materialize_from(deltas))
    stream = run([job(n, (5, 5)) for n in deltas], Echo(), executor)
    next(stream)
    stream.close()
    alive = [t.name for t in threading.enumerate() if t.name.startswith(("spectra-reader", "spectra-cpu"))]
    assert alive == []


def test_progress_sees_every_job_including_skipped_ones() -> None:
    names = ["a", "b", "c"]
    deltas: dict[str, Delta | Skipped] = {
        "a": dense("a", np.eye(2)),
        "b": Skipped("b", "unchanged"),
        "c": dense("c", np.eye(2)),
    }
    seen: list[int] = []

    def progress(items: Iterable[Any]) -> Iterable[Any]:
        seen.append(len(items))  # type: ignore[arg-type]  # the stream is Sized
        yield from items

    got = list(
        run([job(n, (2, 2)) for n in names], Echo(), LocalExecutor(materialize=materialize_from(deltas)), progress)
    )
    assert seen == [3] and len(got) == 3


def test_kernels_are_frozen_picklable_and_validated() -> None:
    for kernel in (Values("fast"), Values("exact"), TopK(8)):
        assert pickle.loads(pickle.dumps(kernel)) == kernel
    assert Values("exact").wide and not Values("fast").wide
    assert Values().result_nbytes((100, 30)) == 240
    with pytest.raises(OptionsError, match="precision"):
        Values("quick")


def test_resources_are_validated() -> None:
    assert Resources() == Resources("cpu", None, None)
    for bad in ({"device": "auto"}, {"threads": 0}, {"batch_bytes": 0}):
        with pytest.raises(OptionsError):
            Resources(**bad)  # type: ignore[arg-type]
    assert torch.device(Resources("cuda:1").device).index == 1
