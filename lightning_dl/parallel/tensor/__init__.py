"""Tensor parallelism on DTensor, torch only: the automatic plan (Megatron's Linear pairs and attention heads found
in execution order), ``apply_tp`` over a 1-D mesh, ``apply_fsdp`` (FSDP2 over dp, after TP), and ``explain_plan`` to
read a plan without processes."""

from lightning_dl.parallel.tensor.apply import apply_tp, explain_plan, plan_from_dict
from lightning_dl.parallel.tensor.attention import HeadParallelAttention
from lightning_dl.parallel.tensor.fsdp import apply_fsdp
from lightning_dl.parallel.tensor.plan import STYLES, PlanEntry, TPPlan
from lightning_dl.parallel.tensor.planner import auto_plan

__all__ = [
    "STYLES",
    "HeadParallelAttention",
    "PlanEntry",
    "TPPlan",
    "apply_fsdp",
    "apply_tp",
    "auto_plan",
    "explain_plan",
    "plan_from_dict",
]
