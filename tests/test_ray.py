"""The Ray executor on a local Ray cluster started here (2 CPUs and 2 logical GPUs, shared by the module): the
same JSON as the local executor, a killed actor's job retried, a bad tensor reported as locally. Marked `ray`:
run with `python -m pytest -m ray` (skipped without the ray extra)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_cli import assert_clean_error, invoke

from conftest import PairFactory, save_checkpoint
from spectra import Options, SpectraError
from spectra.engine.executor import run
from spectra.engine.kernels import Values
from spectra.engine.local import LocalExecutor
from spectra.engine.ray import RayExecutor
from spectra.io.checkpoint import open_checkpoint
from spectra.io.tensors import Handles
from spectra.plan.delta import make_delta
from spectra.plan.dense import plan_pair
from spectra.plan.jobs import Job
from spectra.records import Delta, Resources, Skipped

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

RUN_FIELDS = ("device", "elapsed_s", "created")  # where and how long: differ between runs by design
PLACEMENT = ("executor", "ray_address", "devices")  # options that only say where to compute


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    """One local Ray for the module (start-up costs seconds): 2 CPUs, and 2 logical GPUs that torch does not see,
    so GPU actors fall back to the CPU."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors unpickle KillOnce without tests/
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def rank_json(base: Path, tuned: Path, out: Path, *flags: str) -> dict[str, Any]:
    result = invoke("rank", base, tuned, "--json", out, "--tsv", *flags)
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(out.read_text())
    for key in RUN_FIELDS:
        data.pop(key)
    for key in PLACEMENT:
        data["options"].pop(key)
    return data


@pytest.mark.parametrize(("layout", "device"), [("file", "cpu"), ("shards", "auto")])
def test_ray_writes_the_json_the_local_executor_writes(
    planted_pair: PairFactory, tmp_path: Path, layout: str, device: str
) -> None:
    """CPU actors on a planted single-file pair; GPU actors (logical GPUs, CPU fallback) on a sharded pair."""
    base, tuned, _ = planted_pair(layout=layout, shape=(72, 40))
    local = rank_json(base, tuned, tmp_path / "local.json", "--device", device)
    remote = rank_json(base, tuned, tmp_path / "ray.json", "--device", device, "--executor", "ray")
    assert remote == local
    assert json.loads((tmp_path / "ray.json").read_text())["device"] == f"ray:2×{'cuda' if device == 'auto' else 'cpu'}"


@dataclass(frozen=True)
class KillOnce:
    """make_delta, except that the first `times` attempts at job `name` end their actor's process (SystemExit),
    each leaving a line in `marker`; later attempts, in restarted actors, read normally."""

    name: str
    marker: str
    times: int = 1

    def __call__(self, job: Job, handles: Handles, *, wide: bool = False) -> Delta | Skipped:
        if job.name == self.name and attempts(self.marker) < self.times:
            with open(self.marker, "a") as log:
                log.write("killed\n")
            raise SystemExit(1)  # on a reader thread: LocalExecutor re-raises it in the actor's task
        return make_delta(job, handles, wide=wide)


def attempts(marker: str) -> int:
    return len(Path(marker).read_text().splitlines()) if os.path.exists(marker) else 0


def test_a_killed_actor_is_restarted_and_its_job_retried(planted_pair: PairFactory, tmp_path: Path) -> None:
    base, tuned, _ = planted_pair(layout="shards", shape=(56, 40), seed=2)
    with open_checkpoint(str(base)) as b, open_checkpoint(str(tuned)) as t:
        jobs = plan_pair(b, t, Options()).jobs
    marker = tmp_path / "killed"
    kernel = Values("fast")
    local = dict(run(jobs, kernel, LocalExecutor(Resources("cpu", threads=1))))
    killer = KillOnce(jobs[2].name, str(marker))
    remote = list(run(jobs, kernel, RayExecutor(device="cpu", materialize=killer)))
    assert attempts(str(marker)) == 1  # the first attempt did die
    assert sorted(j.name for j, _ in remote) == sorted(j.name for j in jobs)
    for job, got in remote:
        want = local[job]
        assert not isinstance(got, Skipped) and not isinstance(want, Skipped)
        assert got == want
        np.testing.assert_array_equal(got.s, want.s)


def test_a_corrupt_tensor_fails_as_it_does_locally(tmp_path: Path) -> None:
    """The NaN is found by the actor that reads it; the CLI prints the same one line and exits 1, as locally."""
    torch.manual_seed(0)
    w = {f"l{i}.weight": torch.randn(40, 30) for i in range(4)}
    tuned = {k: v + 1e-2 * torch.randn_like(v) for k, v in w.items()}
    tuned["l2.weight"][7, 3] = float("nan")
    base_path, tuned_path = save_checkpoint(w, tmp_path / "b"), save_checkpoint(tuned, tmp_path / "t")
    out = tmp_path / "a.json"
    local = invoke("rank", base_path, tuned_path, "--json", out, "--device", "cpu", "--no-resume")
    remote = invoke("rank", base_path, tuned_path, "--json", out, "--device", "cpu", "--executor", "ray", "--no-resume")
    assert_clean_error(local, 1, "tuned tensor 'l2.weight'", "NaN/Inf")
    assert_clean_error(remote, 1)
    assert remote.stderr == local.stderr and not out.exists()


def test_retries_are_bounded(planted_pair: PairFactory, tmp_path: Path) -> None:
    """A job that kills every actor it runs on stops the run after `retries` restarts, with one line."""
    base, tuned, _ = planted_pair()
    with open_checkpoint(str(base)) as b, open_checkpoint(str(tuned)) as t:
        jobs = plan_pair(b, t, Options()).jobs
    marker = tmp_path / "killed"
    killer = KillOnce(jobs[0].name, str(marker), times=10)
    with pytest.raises(SpectraError, match=r"^a Ray actor died 2 times computing a chunk of jobs \(") as caught:
        list(run(jobs, Values("fast"), RayExecutor(device="cpu", retries=1, materialize=killer)))
    assert "\n" not in str(caught.value) and attempts(str(marker)) == 2
