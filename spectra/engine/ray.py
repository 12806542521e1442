"""The Ray executor: the same jobs on Ray actors, one per GPU, or one per CPU worker on a cluster without GPUs.

Each actor runs a LocalExecutor on its device over the jobs it is handed (its own reader thread, handle cache and
byte budget) and opens the checkpoint files itself: jobs name tensors by path and byte range, so every node must
read the checkpoints at the same paths (a shared filesystem, or the same copy on every node). Tensors never go
through Ray's object store: only jobs go out and results (σ, top-k factors) come back. The driver cuts the jobs,
largest first, into chunks of same-shape jobs (a GPU stacks them), a few per actor, and a `ray.util.ActorPool`
hands the next chunk to whichever actor is free.

Failures: an actor that dies (killed, out of memory, its node lost) is restarted and its chunk run again, at most
`retries` times (Ray's max_restarts and max_task_retries); then the run stops with a SpectraError. A SpectraError
from bad data (a NaN tensor, a truncated file) is returned by the actor as a value and re-raised here with its own
type and message, exactly as the local executor raises it, never as a Ray traceback. Other errors are bugs: they
propagate as Ray raises them.

Ray is imported when a run starts, from the optional extra: pip install 'spectra-lm[ray]'.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import math
from collections.abc import Generator, Sequence
from typing import Any, Final, TypeVar

import torch

from spectra.engine.executor import largest_first
from spectra.engine.kernels import Kernel
from spectra.engine.local import LocalExecutor, Materialize
from spectra.errors import OptionsError, SpectraError
from spectra.plan.delta import make_delta
from spectra.plan.jobs import Dense, Factored, Job
from spectra.records import DEVICES, Resources, Skipped

log = logging.getLogger(__name__)

R = TypeVar("R")

MAX_CHUNK: Final = 8  # jobs per actor call at most (same shape: stacked on a GPU)
CHUNKS_PER_ACTOR: Final = 4  # at least this many chunks per actor while jobs allow: the last ones balance the load
RETRIES: Final = 2  # times a chunk is run again after its actor died


class RayExecutor:
    """Runs jobs on Ray actors (one per GPU, or one per CPU worker without GPUs); see the module docstring.

    Args:
        address: the cluster to join: "auto", "HOST:PORT", "ray://HOST:PORT" (Ray Client); None: the Ray this
            process already joined, else a local Ray started here on demand.
        device: "auto" (GPU actors when the cluster has GPUs, else CPU actors), "cuda" (GPU actors; refused on a
            cluster without GPUs) or "cpu".
        threads: CPU threads per actor (CPU actors: each reserves this many CPUs, default 1).
        batch_bytes: each actor's byte budget (None: derived from its device, as locally).
        retries: times a chunk is run again after its actor died.
        actors: number of actors (default: one per GPU, or CPUs // threads).
        materialize: how an actor turns a job into its matrix (default: spectra.plan.delta.make_delta); must be
            picklable by reference (a module-level function or class).
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        device: str = "auto",
        threads: int | None = None,
        batch_bytes: int | None = None,
        retries: int = RETRIES,
        actors: int | None = None,
        materialize: Materialize = make_delta,
    ) -> None:
        if device not in DEVICES:
            raise OptionsError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
        if retries < 0 or (actors is not None and actors < 1):
            raise OptionsError(f"retries must be ≥ 0 and actors ≥ 1, got {retries} and {actors}")
        Resources("cpu", threads, batch_bytes)  # validates threads and batch_bytes
        self.address, self.device, self.threads, self.batch_bytes = address, device, threads, batch_bytes
        self.retries, self.actors, self.materialize = retries, actors, materialize
        self.label = "ray"  # after a run: "ray:2×cuda", "ray:4×cpu" (Analysis.device)

    def run(self, jobs: Sequence[Job], kernel: Kernel[R]) -> Generator[tuple[Job, R | Skipped], None, None]:
        """(job, result) for every job, in completion order (largest jobs are handed out first).

        Raises:
            OptionsError: Ray is not installed, device "cuda" on a cluster without GPUs, or a job over tensors in
                memory (not files).
            SpectraError: the cluster cannot be reached, an actor died more than `retries` times, or a job's own
                error (CheckpointError, ...) as the local executor raises it.
        """
        if not jobs:
            return
        local = next((job for job in jobs if not isinstance(job.operand, Dense | Factored)), None)
        if local is not None:  # in-memory tensors (a state dict, an nn.Module) cannot reach other processes
            raise OptionsError(
                f"{local.name}: in-memory inputs run on the local executor only; drop --executor ray, or save the "
                "model as safetensors on storage every node reads"
            )
        ray = import_ray()
        connect(ray, self.address)
        gpu, n_actors = self._placement(ray)
        chunks = chunk_jobs(jobs, n_actors)
        n_actors = min(n_actors, len(chunks))
        cpus = 1 if gpu else (self.threads or 1)
        worker = ray.remote(Worker).options(
            num_cpus=cpus,
            num_gpus=1 if gpu else 0,
            max_restarts=self.retries,
            max_task_retries=self.retries,
        )
        threads = self.threads if gpu else cpus
        actors = [worker.remote(gpu, threads, self.batch_bytes, self.materialize) for _ in range(n_actors)]
        self.label = f"ray:{n_actors}×{'cuda' if gpu else 'cpu'}"
        log.info("engine: %s, %d chunks of ≤ %d jobs, %s", self.label, len(chunks), max(map(len, chunks)), kernel)
        finished = False
        try:
            pool = importlib.import_module("ray.util").ActorPool(actors)
            for chunk in chunks:
                pool.submit(lambda actor, c: actor.run.remote(c, kernel), chunk)
            n_done = 0
            while pool.has_next():
                try:
                    got = pool.get_next_unordered()
                except ray.exceptions.RayActorError as exc:
                    raise SpectraError(
                        f"a Ray actor died {self.retries + 1} times computing a chunk of jobs "
                        f"({_first_line(exc)}); check the Ray logs (out of memory?), lower --batch-bytes, "
                        "or leave the largest matrices out with --exclude"
                    ) from None
                if isinstance(got, SpectraError):
                    raise got
                n_done += len(got)
                yield from got
            if n_done != len(jobs):  # an actor was lost without an error (it should not happen)
                raise SpectraError(f"the Ray cluster returned {n_done} of {len(jobs)} results; run again")
            finished = True
        finally:
            if not finished:  # an error, or the caller stopped early: stop the chunks still running now
                for actor in actors:
                    ray.kill(actor)
            actors.clear()  # done: the actors exit once no handle is left (gracefully, unlike ray.kill)

    def _placement(self, ray: Any) -> tuple[bool, int]:
        """(GPU actors?, number of actors) from the cluster's resources and this executor's settings."""
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        if self.device == "cuda" and gpus == 0:
            raise OptionsError("device 'cuda' asked for, but the Ray cluster has no GPUs; use --device cpu or auto")
        gpu = self.device != "cpu" and gpus > 0
        n = gpus if gpu else max(1, cpus // (self.threads or 1))
        return gpu, self.actors or n


class Worker:
    """One Ray actor: a LocalExecutor on the actor's GPU (Ray makes it the only visible one), or on the CPU.

    A GPU actor on a node where torch sees no CUDA device (logical GPUs, as tests declare them) runs on the CPU.
    """

    def __init__(self, gpu: bool, threads: int | None, batch_bytes: int | None, materialize: Materialize) -> None:
        device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
        if gpu and device == "cpu":
            log.warning("ray actor: a GPU was assigned but torch sees no CUDA device; computing on the CPU")
        self.executor = LocalExecutor(Resources(device, threads, batch_bytes), materialize=materialize)

    def run(self, jobs: Sequence[Job], kernel: Kernel[Any]) -> list[tuple[Job, Any]] | SpectraError:
        """The chunk's (job, result) pairs in order, or the SpectraError a job raised (sent back as a value)."""
        try:
            return list(self.executor.run(jobs, kernel))
        except SpectraError as exc:
            return exc


def chunk_jobs(jobs: Sequence[Job], n_actors: int) -> list[tuple[Job, ...]]:
    """The jobs, largest first, cut into chunks of same-shape jobs: at most MAX_CHUNK each, and small enough that
    every actor gets about CHUNKS_PER_ACTOR chunks or more."""
    ordered = sorted(jobs, key=largest_first)
    size = max(1, min(MAX_CHUNK, math.ceil(len(ordered) / (CHUNKS_PER_ACTOR * n_actors))))
    chunks: list[tuple[Job, ...]] = []
    for _, same in itertools.groupby(ordered, key=lambda job: job.shape):
        group = list(same)
        chunks += [tuple(group[i : i + size]) for i in range(0, len(group), size)]
    return chunks


def import_ray() -> Any:
    """The ray module. Raises OptionsError (one line) when the ray extra is not installed."""
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise OptionsError(
            "the Ray executor needs Ray: pip install 'spectra-lm[ray]' (or use --executor local)"
        ) from None


def connect(ray: Any, address: str | None) -> None:
    """Join the cluster at `address` unless this process already has; None starts a local Ray.

    Raises:
        SpectraError: the cluster cannot be reached.
    """
    if ray.is_initialized():
        return
    try:
        if address is None:
            ray.init(include_dashboard=False, logging_level=logging.WARNING)
        else:
            ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
        where = address or "a local Ray"
        raise SpectraError(
            f"could not start or reach the Ray cluster at {where} ({_first_line(exc)}); start one with "
            "`ray start --head`, or pass --executor ray to start a local one"
        ) from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
