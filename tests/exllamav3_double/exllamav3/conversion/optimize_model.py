"""TEST DOUBLE of exllamav3's optimizer: spend a bit budget on the measured groups, best KL gain per bit first."""

from __future__ import annotations


def _gain(dkld: float) -> float:
    # exllamav3 damps KL improvements (negative changes) by a power of 0.69 and keeps losses as they are.
    return dkld if dkld > 0 else -((-dkld) ** 0.69)


def optimize(
    meas: dict, base_numel: int, base_cost: int, target_cost: float, base_kld: float, num_q: int
) -> list:
    """Per group, 0 (the base) or 1 + the index of the alternative chosen; the added bits stay below the budget."""
    groups = meas["groups"]
    chosen = [0] * len(groups)
    budget = target_cost - base_cost
    while True:
        best = None
        best_ratio = 0.0
        for i, group in enumerate(groups):
            now = chosen[i]
            for j, candidate in enumerate(group["candidates"][:num_q]):
                if j < now:
                    continue
                dk = _gain(candidate["dkld"])
                db = candidate["dbits"]
                if now > 0:
                    dk -= _gain(group["candidates"][now - 1]["dkld"])
                    db -= group["candidates"][now - 1]["dbits"]
                ratio = 1e10 * dk / (db + 1)
                if ratio < best_ratio and budget > db:
                    best, best_ratio = (i, j, db), ratio
        if best is None:
            return chosen
        i, j, db = best
        chosen[i] = j + 1
        budget -= db
