"""Mixed precision: choose bits and group size per group of linears to minimize the predicted loss
rise (the sum of the sensitivity table's per-group rises) under a budget of bits per weight.

A multiple-choice knapsack, solved by dynamic programming over the budget in small units; each
choice's cost is rounded up to whole units, so the chosen allocation never exceeds the budget.
Costs are the packed sizes of the gptq format (codes, zero points, fp16 scales, g_idx), the same
bytes the checkpoint's report counts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import PER_CHANNEL
from ..errors import ConfigError
from .sensitivity import SensitivityTable

BUDGET_UNITS = 20000


def packed_bits(out_features: int, in_features: int, bits: int, group_size: int) -> int:
    """Bits the gptq format stores for one linear: qweight, qzeros, scales (fp16), g_idx (int32)."""
    groups = 1 if group_size == PER_CHANNEL else -(-in_features // group_size)
    return in_features * out_features * bits + groups * out_features * (bits + 16) + in_features * 32


@dataclass
class Allocation:
    choices: dict[str, tuple[int, int]]  # module name -> (bits, group_size)
    delta_loss: dict[str, float]  # module name -> its group's predicted rise, split evenly over the group
    predicted_delta_loss: float  # the sum of the minimized measure (kl by default) over the groups
    bits_per_weight: float
    budget_bits_per_weight: float
    metric: str = "kl"


def allocate(table: SensitivityTable, target_bits_per_weight: float, metric: str = "kl") -> Allocation:
    """metric: the table's column to minimize, "kl" (default) or "delta_loss" (see sensitivity.py)."""
    groups = table.groups()
    if metric not in ("kl", "delta_loss") or any(metric not in row for row in table.rows):
        raise ConfigError(f"the sensitivity table has no {metric!r} column to allocate by")
    if not groups:
        raise ConfigError("the sensitivity table is empty")
    parameters = sum(rows[0]["parameters"] for rows in groups.values())
    budget = target_bits_per_weight * parameters
    costs = {key: [sum(packed_bits(*shape, row["bits"], row["group_size"]) for shape in row["shapes"]) for row in rows]
             for key, rows in groups.items()}
    cheapest = sum(min(c) for c in costs.values())
    if cheapest > budget:
        raise ConfigError(f"--target-bpw {target_bits_per_weight} is below the cheapest allocation the table "
                          f"offers ({cheapest / parameters:.3f} bits per weight)")
    # The DP runs on each choice's cost above its group's cheapest one, rounded up to units of the
    # budget left over the all-cheapest allocation: that allocation always fits, and no rounded
    # choice can exceed the real budget.
    floor = {key: min(c) for key, c in costs.items()}
    spare = budget - cheapest
    unit = max(spare, 1e-9) / BUDGET_UNITS
    capacity = BUDGET_UNITS
    best = np.zeros(capacity + 1)  # best[c]: least predicted rise of the groups so far within c units
    picks = []
    for key, rows in groups.items():
        units = [int(np.ceil((cost - floor[key]) / unit)) for cost in costs[key]]
        candidates = np.full((len(rows), capacity + 1), np.inf)
        for i, (row, u) in enumerate(zip(rows, units)):
            if u <= capacity:
                candidates[i, u:] = best[:capacity + 1 - u] + row[metric]
        picks.append((key, units, candidates.argmin(axis=0)))
        best = candidates.min(axis=0)
    remaining, choices, rises, total_loss, total_bits = capacity, {}, {}, 0.0, 0
    for key, units, pick in reversed(picks):
        index = pick[remaining]
        row = groups[key][index]
        total_loss += row[metric]
        total_bits += costs[key][index]
        remaining -= units[index]
        for name in key:
            choices[name] = (row["bits"], row["group_size"])
            rises[name] = row[metric] / len(key)
    return Allocation(choices, rises, total_loss, total_bits / parameters, target_bits_per_weight, metric)
