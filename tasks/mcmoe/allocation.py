"""PMQ bit allocation: a multiple-choice knapsack per MoE layer, solved exactly by dynamic programming.

Per layer, choose one width b_e from the candidate widths for each of the E experts to minimise
sum_e cost[e, b_e] (cost = freq^a * weight^b * loss(bits), built by the caller) subject to

  * the budget: sum_e b_e <= floor(avg_bits * E), so the average never exceeds `avg_bits`;
  * with `exact=True` (default) the total must *equal* the largest total reachable under that cap,
    so the average equals `avg_bits` whenever some allocation has exactly that average (e.g. 2.5
    bits over 8 experts = 20 bits) and is the closest reachable average below it otherwise (2.5 over
    3 experts -> 7 bits, 2.33). With `exact=False` any total up to the cap is allowed and only the
    cost decides (it can then leave bits unused when extra bits do not lower the cost);
  * optionally the paper's constraints: at least one expert at the highest candidate width and one
    at the second-highest.

Widths are small integers, so the state is (total bits so far, which constraints are met): the DP
is O(E * |widths| * 4 * E * max_width), exact, with no solver dependency. An infeasible budget
raises `AllocationError` naming the smallest feasible average.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


class AllocationError(ValueError):
    """No allocation satisfies the budget and constraints."""


def budget_total(avg_bits: float, num_experts: int) -> int:
    return int(math.floor(avg_bits * num_experts + 1e-9))


def _flags(candidates: Sequence[int], constraints: bool) -> tuple[list[int], int]:
    """Per candidate the constraint bits it satisfies, and the bits the final allocation needs."""
    if not constraints:
        return [0] * len(candidates), 0
    top = max(candidates)
    flags = [1 if b == top else 0 for b in candidates]
    need = 1
    if len(candidates) >= 2:
        second = sorted(candidates)[-2]
        flags = [f | (2 if b == second else 0) for f, b in zip(flags, candidates)]
        need = 3
    return flags, need


def check_candidates(candidates: Sequence[int]) -> list[int]:
    cands = sorted(int(b) for b in candidates)
    if not cands or len(set(cands)) != len(cands) or cands[0] < 1:
        raise AllocationError(f"candidate bit widths {list(candidates)} must be distinct positive integers")
    return cands


def min_feasible_total(num_experts: int, candidates: Sequence[int], constraints: bool) -> int:
    cands = check_candidates(candidates)
    if not constraints or len(cands) == 1:
        return num_experts * cands[0]
    if num_experts < 2:
        return -1  # cannot hold both the highest and the second-highest width
    return cands[-1] + cands[-2] + (num_experts - 2) * cands[0]


def check_budget(avg_bits: float, num_experts: int, candidates: Sequence[int], constraints: bool,
                 where: str = "") -> None:
    """Raise AllocationError if no allocation of `num_experts` experts fits `avg_bits`."""
    cands = check_candidates(candidates)
    lowest = min_feasible_total(num_experts, cands, constraints)
    loc = f" ({where})" if where else ""
    if lowest < 0:
        raise AllocationError(
            f"the paper constraints need at least 2 experts per layer{loc}, this layer has {num_experts}; "
            "turn the constraints off (paper_constraints=false / --no-paper-constraints)")
    if lowest > budget_total(avg_bits, num_experts):
        what = " with the paper constraints (one expert at the highest width, one at the second)" if constraints and len(cands) > 1 else ""
        raise AllocationError(
            f"avg_bits={avg_bits} is infeasible for {num_experts} experts{loc} with candidate widths {cands}{what}: "
            f"the smallest feasible average is {lowest / num_experts:g} bits; raise avg_bits"
            + (" or turn the paper constraints off" if what else " or add a lower candidate width"))


def allocate_bits(costs, candidates: Sequence[int], avg_bits: float, paper_constraints: bool = True,
                  exact: bool = True) -> list[int]:
    """Optimal width per expert. `costs[e][j]` is expert e's cost at `candidates[j]` (any order)."""
    costs = np.asarray(costs, dtype=np.float64)
    cand_in = [int(b) for b in candidates]
    check_candidates(cand_in)
    if costs.ndim != 2 or costs.shape[1] != len(cand_in):
        raise ValueError(f"costs must be [experts, {len(cand_in)}], got {costs.shape}")
    if not np.all(np.isfinite(costs)):
        raise ValueError("allocation costs must be finite")
    n = costs.shape[0]
    check_budget(avg_bits, n, cand_in, paper_constraints)
    cap = budget_total(avg_bits, n)
    top = max(cand_in) * n
    flags, need = _flags(cand_in, paper_constraints)
    inf = np.inf
    dp = np.full((4, top + 1), inf)
    dp[0, 0] = 0.0
    back_choice = np.full((n, 4, top + 1), -1, dtype=np.int16)
    back_flag = np.zeros((n, 4, top + 1), dtype=np.int8)
    for e in range(n):
        new = np.full_like(dp, inf)
        for j, (b, fj) in enumerate(zip(cand_in, flags)):
            for f in range(4):
                src = dp[f, : top + 1 - b] + costs[e, j]
                nf = f | fj
                dst = new[nf, b:]
                better = src < dst
                if better.any():
                    dst[better] = src[better]
                    back_choice[e, nf, b:][better] = j
                    back_flag[e, nf, b:][better] = f
        dp = new
    final = [f for f in range(4) if f & need == need]
    best_cost = np.min(dp[final], axis=0)  # [top+1] over flag states meeting the constraints
    totals = np.arange(top + 1)
    feasible = np.isfinite(best_cost) & (totals <= cap)
    if not feasible.any():  # check_budget should have caught this
        raise AllocationError(f"no allocation of {n} experts fits avg_bits={avg_bits} with widths {cand_in}")
    if exact:
        t = int(totals[feasible].max())
    else:
        masked = np.where(feasible, best_cost, inf)
        t = int(np.argmin(masked))  # ties: the smallest total
    f = min(final, key=lambda ff: (dp[ff, t], ff))
    out = [0] * n
    for e in range(n - 1, -1, -1):
        j = int(back_choice[e, f, t])
        out[e] = cand_in[j]
        f, t = int(back_flag[e, f, t]), t - cand_in[j]
    return out
