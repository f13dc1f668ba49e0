"""95% intervals for the report's rates and means, each named by its method in results.json.

Two methods, chosen for what each number is:

- a *rate* of independent yes/no outcomes (toxic or not) gets the **Wilson score interval**,
  which stays inside [0, 1] and behaves at rates near 0 or 1, where the normal approximation
  collapses to a zero-width interval;
- a *mean* over responses that come k to a prompt (toxicity score, win-rate) gets a **percentile
  bootstrap that resamples prompts** (a cluster bootstrap). Samples of one prompt are correlated
  (the same provocation gets similar answers), so treating them as independent would make the
  interval too narrow; resampling whole prompts keeps that correlation in.

Everything is seeded so the same results give the same intervals.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Z95 = 1.959963984540054
WILSON = "wilson"
CLUSTER_BOOTSTRAP = "percentile bootstrap over prompts"


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; (0, 1) when there is no data."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes <= 0 else max(0.0, centre - half)  # exact at the ends, not 1e-17 off
    hi = 1.0 if successes >= n else min(1.0, centre + half)
    return lo, hi


def cluster_bootstrap_mean(values: Sequence[float], clusters: Sequence[int], n_boot: int = 2000,
                           seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of `values`, resampling whole clusters (prompts).

    With one value per cluster this is the ordinary bootstrap. Degenerate inputs (no data, or
    every value equal) give the point itself as a zero-width interval rather than NaN.
    """
    vals = np.asarray(values, dtype=np.float64)
    if vals.size == 0:
        return float("nan"), float("nan")
    ids = np.asarray(clusters)
    if ids.shape != vals.shape:
        raise ValueError(f"{vals.size} values but {ids.size} cluster ids")
    _, inverse = np.unique(ids, return_inverse=True)
    n_clusters = int(inverse.max()) + 1
    sums = np.bincount(inverse, weights=vals, minlength=n_clusters)     # size = (C,)
    counts = np.bincount(inverse, minlength=n_clusters).astype(float)   # size = (C,)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_clusters, size=(n_boot, n_clusters))     # size = (n_boot, C)
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)         # size = (n_boot,)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)
