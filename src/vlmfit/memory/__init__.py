"""VRAM planner: predict the memory of a training run from the model config alone (meta device, no weights),
fit a recipe to a GPU budget, and measure real steps to check the prediction.

    from vlmfit.memory import plan_memory, fit, parse_budget
    bd = plan_memory(cfg, budget=parse_budget("14GiB")); console.print(bd.table())
"""

from vlmfit.memory.budget import GPUS_MIB, SAFETY_MARGIN, parse_budget, verdict
from vlmfit.memory.catalog import load_model_config, published_counts, shipped_ids
from vlmfit.memory.estimate import STRATEGIES, Breakdown, PlanInputs, estimate, inputs_from_config, per_gpu, plan_memory
from vlmfit.memory.fit import fit, write_recipe
from vlmfit.memory.shape import model_shape

__all__ = [
    "GPUS_MIB", "SAFETY_MARGIN", "STRATEGIES", "Breakdown", "PlanInputs", "estimate", "fit", "inputs_from_config",
    "load_model_config", "model_shape", "parse_budget", "per_gpu", "plan_memory", "published_counts", "shipped_ids",
    "verdict", "write_recipe",
]
