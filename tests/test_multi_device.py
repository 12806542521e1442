"""The local executor over several devices (one worker per device, a shared queue, largest jobs first), tested with
fake devices: several "cpu" workers through the same code path, on the CPU and the stacked (GPU) path; device
resolution and the executor settings in Options; real CUDA devices in the `gpu` tests."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from test_spectrum import dense, job

from conftest import PairFactory
from spectra import Options, OptionsError, analyze
from spectra.engine.executor import largest_first, run
from spectra.engine.kernels import TopK, Values
from spectra.engine.local import LocalExecutor, batch_budget, resolve_devices
from spectra.engine.ray import RayExecutor
from spectra.io.checkpoint import open_checkpoint
from spectra.io.tensors import Handles
from spectra.pipeline import make_executor
from spectra.plan.dense import plan_pair
from spectra.plan.jobs import Job
from spectra.records import Delta, Resources, Skipped

FAKE = Resources(devices=("cpu", "cpu", "cpu"), threads=1)


@dataclass(frozen=True)
class Named:
    """A kernel whose result is (matrix name, the thread that computed it), after `delay` seconds per call."""

    delay: float = 0.0

    @property
    def wide(self) -> bool:
        return False

    def compute(self, deltas: Sequence[Delta], threads: int | None = None) -> list[tuple[str, str]]:
        time.sleep(self.delay)
        return [(d.name, str(threading.get_ident())) for d in deltas]

    def result_nbytes(self, shape: tuple[int, int]) -> int:
        return 8


class Recording:
    """A materialiser that hands over matrices of ones and records which reader thread took which job, in order."""

    def __init__(self, shapes: dict[str, tuple[int, int]], fail: str | None = None) -> None:
        self.shapes, self.fail = shapes, fail
        self.taken: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def __call__(self, j: Job, handles: Handles, *, wide: bool = False) -> Delta | Skipped:
        with self._lock:
            self.taken.append((j.name, str(threading.get_ident())))
        if j.name == self.fail:
            raise ZeroDivisionError(f"cannot read {j.name}")
        if j.name.startswith("zero"):
            return Skipped(j.name, "unchanged", "ΔW = 0")
        return dense(j.name, np.ones(self.shapes[j.name]))


def shapes_for(n: int) -> dict[str, tuple[int, int]]:
    return {f"m{i}": (4 + i % 5, 3 + i % 3) for i in range(n)}


@pytest.mark.parametrize("stacked", [False, True])
def test_fake_devices_give_the_single_device_results(planted_pair: PairFactory, stacked: bool) -> None:
    """Three fake devices compute every job exactly once, with the same σ to the bit as one device."""
    base, tuned, _ = planted_pair(layout="shards")
    with open_checkpoint(str(base)) as b, open_checkpoint(str(tuned)) as t:
        jobs = plan_pair(b, t, Options()).jobs
    for kernel in (Values("fast"), TopK(3)):
        one = dict(run(jobs, kernel, LocalExecutor(Resources("cpu", threads=1), stacked=stacked)))
        spread = list(run(jobs, kernel, LocalExecutor(FAKE, stacked=stacked)))
        assert sorted(j.name for j, _ in spread) == sorted(j.name for j in jobs)
        for j, got in spread:
            want = one[j]
            assert not isinstance(got, Skipped) and not isinstance(want, Skipped)
            assert got == want
            np.testing.assert_array_equal(got.s, want.s)


@pytest.mark.parametrize("stacked", [False, True])
def test_jobs_are_handed_out_largest_first_to_every_device(stacked: bool) -> None:
    shapes = shapes_for(24)
    materialize = Recording(shapes)
    jobs = [job(n, s) for n, s in shapes.items()] + [job("zero.a", (2, 2))]
    got = list(LocalExecutor(FAKE, stacked=stacked, materialize=materialize).run(jobs, Named(delay=0.01)))
    assert sorted(j.name for j, _ in got) == sorted(j.name for j in jobs)
    order = [j.name for j in sorted(jobs, key=largest_first)]
    readers = {reader for _, reader in materialize.taken}
    assert len(readers) == 3  # each device's own reader took jobs from the shared queue, in its order
    for reader in readers:
        mine = [n for n, r in materialize.taken if r == reader]
        assert mine == sorted(mine, key=order.index)
    assert sorted(n for n, _ in materialize.taken) == sorted(order)
    computed_by = {result[1] for _, result in got if not isinstance(result, Skipped)}
    assert len(computed_by) >= 2  # and more than one device computed (each has its own worker threads)
    skipped = [result for j, result in got if j.name == "zero.a"]
    assert len(skipped) == 1 and isinstance(skipped[0], Skipped)


def spectra_threads() -> list[str]:
    prefixes = ("spectra-reader", "spectra-cpu", "spectra-device")
    return [t.name for t in threading.enumerate() if t.name.startswith(prefixes)]


@pytest.mark.parametrize("stacked", [False, True])
def test_an_error_on_one_device_reaches_the_caller_and_stops_all(stacked: bool) -> None:
    shapes = shapes_for(30)
    executor = LocalExecutor(FAKE, stacked=stacked, materialize=Recording(shapes, fail="m7"))
    with pytest.raises(ZeroDivisionError, match="cannot read m7"):
        list(run([job(n, s) for n, s in shapes.items()], Named(delay=0.005), executor))
    assert spectra_threads() == []


def test_stopping_early_stops_every_device() -> None:
    shapes = shapes_for(40)
    executor = LocalExecutor(FAKE, materialize=Recording(shapes))
    stream = run([job(n, s) for n, s in shapes.items()], Named(delay=0.005), executor)
    next(stream)
    stream.close()
    assert spectra_threads() == []


def test_one_device_runs_in_the_given_order_as_before() -> None:
    shapes = shapes_for(10)
    jobs = [job(n, s) for n, s in shapes.items()]
    got = list(LocalExecutor(Resources("cpu", threads=2), materialize=Recording(shapes)).run(jobs, Named()))
    assert [j for j, _ in got] == jobs
    assert LocalExecutor().label == "cpu" and LocalExecutor(FAKE).label == "cpu,cpu,cpu"


def test_resources_take_several_devices() -> None:
    assert Resources(devices=("cuda:0", "cuda:1")).device == "cuda:0"
    assert Resources("cuda").devices == ()
    with pytest.raises(OptionsError):
        Resources(devices=("cuda:0", "auto"))


def test_each_device_gets_a_budget_from_its_own_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[torch.device] = []

    def mem_get_info(device: torch.device) -> tuple[int, int]:
        asked.append(device)
        return (600 if device.index == 1 else 6000), 10**6

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    resources = Resources(devices=("cuda:0", "cuda:1"))
    assert [batch_budget(resources, torch.device(d)) for d in resources.devices] == [1000, 100]
    assert [d.index for d in asked] == [0, 1]


def fake_gpus(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def test_devices_resolve_to_every_visible_gpu_or_the_ones_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, 0)
    assert resolve_devices("auto") == resolve_devices("cpu") == ("cpu",)
    with pytest.raises(OptionsError, match="torch sees no CUDA device"):
        resolve_devices("auto", ("cuda:1",))
    fake_gpus(monkeypatch, 1)
    assert resolve_devices("auto") == ("cuda",)  # one GPU: exactly as before
    fake_gpus(monkeypatch, 3)
    assert resolve_devices("auto") == resolve_devices("cuda") == ("cuda:0", "cuda:1", "cuda:2")
    assert resolve_devices("cpu") == ("cpu",)
    assert resolve_devices("auto", ("cuda:2", "cuda:0")) == ("cuda:2", "cuda:0")
    with pytest.raises(OptionsError, match=r"'cuda:3' asked for, but torch sees cuda:0..cuda:2"):
        resolve_devices("auto", ("cuda:3",))
    with pytest.raises(OptionsError, match="conflicts"):
        resolve_devices("cpu", ("cuda:0",))


def test_options_name_the_executor_and_devices() -> None:
    assert Options().executor == "local" and Options().ray_address is None and Options().devices is None
    assert Options(devices=["cuda:0", "cuda:1"]).devices == ("cuda:0", "cuda:1")  # type: ignore[arg-type]
    cluster = Options(executor="ray://head:10001")
    assert (cluster.executor, cluster.ray_address) == ("ray", "ray://head:10001")
    assert (Options(executor="ray:auto").executor, Options(executor="ray:auto").ray_address) == ("ray", "auto")
    assert Options(ray_address="auto").executor == "ray"  # --ray-address alone asks for Ray
    assert Options(executor="ray", ray_address="auto") == Options(executor="ray:auto")
    bad: list[dict[str, Any]] = [
        {"devices": ("cuda:0", "cuda:0")},
        {"devices": ("gpu0",)},
        {"devices": ()},
        {"executor": "dask"},
        {"executor": "ray:auto", "ray_address": "other:1"},
        {"ray_address": " "},
        {"executor": "ray", "devices": ("cuda:0",)},
    ]
    for kwargs in bad:
        with pytest.raises(OptionsError):
            Options(**kwargs)


def test_make_executor_builds_what_options_ask_for(monkeypatch: pytest.MonkeyPatch) -> None:
    local = make_executor(Options(device="cpu", threads=2, batch_bytes=4096))
    assert isinstance(local, LocalExecutor) and local.label == "cpu"
    assert local.resources == Resources("cpu", 2, 4096)
    fake_gpus(monkeypatch, 2)
    spread = make_executor(Options())
    assert isinstance(spread, LocalExecutor) and spread.label == "cuda:0,cuda:1"
    ray = make_executor(Options(executor="ray://head:10001", threads=2))  # Ray is only started by a run
    assert isinstance(ray, RayExecutor) and (ray.address, ray.device, ray.threads) == ("ray://head:10001", "auto", 2)


def test_ray_refuses_jobs_over_tensors_in_memory() -> None:
    """Only jobs that name files can go to other processes (no Ray needed: refused before Ray starts)."""

    @dataclass(frozen=True)
    class InMemory:
        tuned: torch.Tensor

    held = Job("w", (2, 2), InMemory(torch.ones(2, 2)))  # type: ignore[arg-type]
    with pytest.raises(OptionsError, match="w: in-memory inputs run on the local executor only"):
        list(RayExecutor().run([job("a", (2, 2)), held], Values()))


def test_the_pipeline_records_the_devices_it_used(planted_pair: PairFactory) -> None:
    base, tuned, _ = planted_pair()
    assert analyze(base, tuned, Options(devices=("cpu",))).device == "cpu"


needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


@needs_two_gpus
@pytest.mark.gpu
def test_every_gpu_gives_what_one_gpu_gives(planted_pair: PairFactory) -> None:
    base, tuned, _ = planted_pair(shape=(256, 192))
    one = analyze(base, tuned, Options(devices=("cuda:0",)))
    every = analyze(base, tuned, Options())
    assert every.device == ",".join(f"cuda:{i}" for i in range(torch.cuda.device_count()))
    for a, b in zip(one.layers, every.layers, strict=True):
        assert a.name == b.name and a.rank == b.rank
        np.testing.assert_allclose(a.s, b.s, rtol=0, atol=1e-6 * a.s[0])


@needs_two_gpus
@pytest.mark.gpu
def test_gpu_devices_stop_cleanly() -> None:
    shapes = shapes_for(40)
    executor = LocalExecutor(Resources(devices=("cuda:0", "cuda:1")), materialize=Recording(shapes))
    with contextlib.closing(run([job(n, s) for n, s in shapes.items()], Values("fast"), executor)) as stream:
        next(stream)
    assert spectra_threads() == []
