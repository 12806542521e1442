"""plan: planners turn inputs into frozen, picklable jobs (plus what was skipped and why); delta.py materialises
a job where it runs."""

from spectra.plan.adapter import plan_adapter
from spectra.plan.delta import make_delta
from spectra.plan.dense import plan_many, plan_pair, plan_weights
from spectra.plan.jobs import Dense, Dora, Factored, Job, Operand, Plan
from spectra.plan.quant import QuantSpec

__all__ = [
    "Dense",
    "Dora",
    "Factored",
    "Job",
    "Operand",
    "Plan",
    "QuantSpec",
    "make_delta",
    "plan_adapter",
    "plan_many",
    "plan_pair",
    "plan_weights",
]
