"""Summary statistics over seeds, shared by the experiments."""

from __future__ import annotations

import math
import statistics


def mean_ci(values: list[float], level: float = 0.95) -> dict:
    """Mean and two-sided Student-t interval over seeds: ``{"mean", "ci": [lo, hi], "n"}`` (NaNs dropped; ``ci``
    NaN for fewer than two values)."""
    from scipy import stats  # heavy; only the aggregating step needs it

    x = [float(v) for v in values if v == v]
    n, m = len(x), sum(x) / len(x) if x else float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * statistics.stdev(x) / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": m, "ci": [m - half, m + half], "n": n}
