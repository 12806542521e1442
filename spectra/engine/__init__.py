"""engine: kernels (what to compute per matrix: Values, TopK) × executors (where: LocalExecutor); run() joins them."""

from spectra.engine.executor import Executor, ProgressHook, identity, run, schedule_key
from spectra.engine.kernels import Energy, Kernel, TopK, Values
from spectra.engine.local import LocalExecutor, resolve_device

__all__ = [
    "Energy",
    "Executor",
    "Kernel",
    "LocalExecutor",
    "ProgressHook",
    "TopK",
    "Values",
    "identity",
    "resolve_device",
    "run",
    "schedule_key",
]
