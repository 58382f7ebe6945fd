"""GPU memory budgets: parse '14GiB' / '16GB' / a card name, and judge a predicted peak against it."""

from __future__ import annotations

import re

from vlmfit.errors import UserError, nearest

GiB = 1024**3

# Total memory per card as nvidia-smi reports it (MiB), not the marketing figure: a "16 GB" V100 shows 16160 MiB.
GPUS_MIB: dict[str, int] = {
    "t4-16gb": 15360,
    "v100-16gb": 16160,
    "v100-32gb": 32768,
    "l4-24gb": 23034,
    "a10-24gb": 23028,
    "rtx3090-24gb": 24576,
    "rtx4090-24gb": 24564,
    "a100-40gb": 40960,
    "a100-80gb": 81920,
    "h100-80gb": 81559,
    "h200-141gb": 143771,
    "rtx6000-48gb": 49140,
    "rtx6000-96gb": 97887,
}

SAFETY_MARGIN = 0.10  # fraction of the budget kept free: allocator fragmentation, library buffers, data spikes

_UNITS = {"gib": GiB, "gb": 1000**3, "g": GiB, "mib": 1024**2, "mb": 1000**2, "tib": 1024**4, "tb": 1000**4}


def parse_budget(text: str) -> int:
    """'14GiB' -> bytes; '16GB' is decimal (16e9); 'a100-80gb' is that card's memory."""
    t = text.strip().lower().replace(" ", "")
    if t in GPUS_MIB:
        return GPUS_MIB[t] * 1024**2
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)([a-z]*)", t)
    if m and m.group(2) in _UNITS:
        return int(float(m.group(1)) * _UNITS[m.group(2)])
    near = nearest(t, GPUS_MIB)
    raise UserError(
        f"cannot read the GPU budget '{text}'",
        where="--gpu",
        hint=(f"did you mean '{near}'? " if near else "") + "give a size such as 14GiB or 16GB, or a card: "
        + ", ".join(GPUS_MIB),
    )


def verdict(total: int, budget: int, margin: float = SAFETY_MARGIN) -> str:
    """'fits' with the margin to spare, 'tight' within the budget but inside the margin, else 'does not fit'."""
    if total <= budget * (1 - margin):
        return "fits"
    if total <= budget:
        return "tight"
    return "does not fit"
