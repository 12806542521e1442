"""engine: kernels (what to compute per matrix: Values, TopK) × executors (where: LocalExecutor, RayExecutor);
run() joins them."""

from spectra.engine.executor import Executor, ProgressHook, identity, largest_first, run, schedule_key
from spectra.engine.kernels import Energy, Kernel, TopK, Values
from spectra.engine.local import LocalExecutor, resolve_device, resolve_devices
from spectra.engine.ray import RayExecutor

__all__ = [
    "Energy",
    "Executor",
    "Kernel",
    "LocalExecutor",
    "ProgressHook",
    "RayExecutor",
    "TopK",
    "Values",
    "identity",
    "largest_first",
    "resolve_device",
    "resolve_devices",
    "run",
    "schedule_key",
]
