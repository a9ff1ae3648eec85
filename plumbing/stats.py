"""Confidence intervals and power, shared by the experiments: the one place the toolkit's statistics live.

* ``mean_ci``: Student-t interval of a mean (over seeds, or over paired per-reply changes).
* ``wilson``: score interval of a proportion k / n (pooled counts; honest from n = 1 on, never a zero-width
  interval).
* ``newcombe``: Newcombe's hybrid score interval (method 10 of Newcombe 1998, Stat. Med. 17:873) for the
  difference of two proportions drawn independently, e.g. two models' replies to the same questions.
* ``stratified_wilson_bounds`` / ``stratified_newcombe_bounds``: the same on the effective sample size of the
  question strata (``design_effect``, Kish): questions differ in EM rate, and an interval on the pooled count,
  which ignores that each question got a fixed number of replies, covers more than its level (97-99.6% measured).
  ``rate_interval`` / ``difference_interval`` pick the one calibrated at the counts (``chosen``).
* ``cluster_difference``: the between-question view -- a bootstrap over questions (both models' replies to a
  question move together) of the difference of pooled rates, widened by the expanded-percentile correction
  (Hesterberg 2015, Am. Stat. 69:371) that the plain percentile bootstrap of a mean needs at a few clusters.
  It speaks for "other questions like these"; the two intervals above speak for the questions asked.
* ``min_detectable_difference`` / ``min_detectable_mean``: the smallest effect a sample detects with 80% power.
* ``two_sided_z``: the normal quantile of a two-sided interval's level.
* ``REPORTED`` / ``reported`` / ``chosen``: at which counts each interval is used. The minimums are the counts at
  which ``python -m llm.experiments.em_calibration`` measured the interval's coverage of a nominal 95% inside [93%, 97%]; at
  other counts no interval is given (``[None, None]``, method None) and nothing is concluded. Where that bites: a
  difference at 1-2 replies per question over 8 questions, with about two EM replies per model, where every
  interval tried covers 98-99.7% under the null (no interval of two such small counts can do better: a run with no
  EM reply on either side covers 0 whatever the interval), and a paired change below 56 pairs.

Every function is vectorised over leading batch dimensions (the calibration runs thousands of simulated
experiments at once) and has no state: the same counts give the same interval.
"""

from __future__ import annotations

import math
import statistics
import warnings

import numpy as np

POWER = 0.8  # the power of the "smallest detectable effect" sentences
DEFF_FLOOR = 0.5  # the smallest design effect believed: replies that repeat within questions (greedy decoding)
# would otherwise make the stratified interval zero-width

# method -> alternatives (minimum counted replies per question, minimum questions, minimum replies in all), any of
# which makes ``llm.experiments.em_calibration`` find the method's coverage of a nominal 95% inside [93%, 97%] under the null and
# a known difference; the pooled score intervals ("wilson", "newcombe") are the fallback below the stratified ones'
# counts. Pooled Newcombe at 1-2 replies x 8 questions covers 98.5-99.6% under the null: not used there.
REPORTED: dict[str, tuple[tuple[int, int, int], ...]] = {
    "wilson_strat": ((5, 8, 0), (2, 56, 0)),
    "newcombe_strat": ((5, 8, 0), (2, 56, 0)),
    "wilson": ((1, 8, 0),),
    "newcombe": ((1, 56, 0),),
    "wilson_question": ((2, 1, 0),),  # one question's rate from its own replies: 90.8-92.5% at one reply
    "cluster": ((1, 56, 0),),
    "paired_t": ((1, 8, 56),),
}


def reported(method: str, replies_per_question: int, n_questions: int) -> bool:
    """Whether the calibration measured ``method``'s interval at (at least) these counts and found it to hold."""
    if method not in REPORTED:
        raise ValueError(f"method {method!r} unknown; calibrated methods: {sorted(REPORTED)}")
    return any(
        replies_per_question >= r and n_questions >= q and replies_per_question * n_questions >= t
        for r, q, t in REPORTED[method]
    )


def chosen(kind: str, replies_per_question: int, n_questions: int) -> str | None:
    """The interval the toolkit uses for a ``"rate"`` or a ``"difference"`` at these counts: the stratified one
    where it is calibrated, else the pooled score interval where that is, else None (no interval is given)."""
    strat, pooled = {"rate": ("wilson_strat", "wilson"), "difference": ("newcombe_strat", "newcombe")}[kind]
    for m in (strat, pooled):
        if reported(m, replies_per_question, n_questions):
            return m
    return None


def two_sided_z(level: float) -> float:
    """The standard normal quantile at ``0.5 + level / 2``: the z of a two-sided interval at ``level`` (1.96 at 0.95)."""
    from scipy.stats import norm  # heavy; only the aggregating steps need it

    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    return float(norm.ppf(0.5 + level / 2))


def _t(level: float, df):
    from scipy.stats import t

    return t.ppf(0.5 + level / 2, df)


def t_bounds(mean, sd, n, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Student-t interval ``mean -+ t_{n-1} sd / sqrt(n)`` (arrays broadcast; NaN where n < 2)."""
    mean, sd, n = np.asarray(mean, float), np.asarray(sd, float), np.asarray(n, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        half = np.where(n > 1, _t(level, np.maximum(n - 1, 1)) * sd / np.sqrt(n), np.nan)
    return mean - half, mean + half


def mean_ci(values: list[float], level: float = 0.95) -> dict:
    """Mean and two-sided Student-t interval: ``{"mean", "ci": [lo, hi], "n"}`` (NaNs and Nones dropped; ``ci``
    NaN for fewer than two values)."""
    x = [float(v) for v in values if v is not None and v == v]
    n, m = len(x), sum(x) / len(x) if x else float("nan")
    lo, hi = t_bounds(m, statistics.stdev(x) if n > 1 else float("nan"), n, level)
    return {"mean": m, "ci": [float(lo), float(hi)], "n": n}


def wilson_bounds(k, n, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of ``k / n`` (arrays broadcast; NaN where n == 0)."""
    k, n = np.asarray(k, float), np.asarray(n, float)
    z = two_sided_z(level)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        c = (p + z * z / (2 * n)) / (1 + z * z / n)
        h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return np.clip(c - h, 0, 1), np.clip(c + h, 0, 1)


def _pair(lo, hi) -> list[float | None]:
    lo, hi = float(lo), float(hi)
    return [None, None] if math.isnan(lo) or math.isnan(hi) else [lo, hi]


def wilson(k: int, n: int, level: float = 0.95) -> list[float | None]:
    """Wilson score interval of a proportion ``k / n``: ``[lo, hi]``, ``[None, None]`` for n = 0."""
    return _pair(*wilson_bounds(k, n, level))


def newcombe_bounds(k1, n1, k2, n2, level: float = 0.95, bounds=wilson_bounds) -> tuple[np.ndarray, np.ndarray]:
    """Newcombe's hybrid score interval of ``k1 / n1 - k2 / n2`` from the two Wilson intervals (arrays
    broadcast; NaN where either n is 0); ``bounds(k, n, level)`` builds it from another one-sample interval."""
    k1, n1, k2, n2 = (np.asarray(x, float) for x in (k1, n1, k2, n2))
    l1, u1 = bounds(k1, n1, level)
    l2, u2 = bounds(k2, n2, level)
    with np.errstate(invalid="ignore", divide="ignore"):
        p1, p2 = k1 / n1, k2 / n2
    d = p1 - p2
    return d - np.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + np.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def newcombe(k1: int, n1: int, k2: int, n2: int, level: float = 0.95) -> list[float | None]:
    """Newcombe's hybrid score interval of ``k1 / n1 - k2 / n2``: ``[lo, hi]``, ``[None, None]`` when a count is 0."""
    return _pair(*newcombe_bounds(k1, n1, k2, n2, level))


def design_effect(k, n) -> np.ndarray:
    """Kish's design effect of a pooled proportion over questions with fixed reply counts: the variance of the
    stratified estimate (within-question variances, unbiased ``n_q / (n_q - 1)``) over the binomial variance of the
    pooled count. Questions differ in rate, so it is below 1; clipped to [``DEFF_FLOOR``, 1], and 1 where the
    pooled share is 0 or 1. ``k, n``: per-question counts (..., Q) -> (...)."""
    k, n = np.asarray(k, float), np.asarray(n, float)
    N = n.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        p, pq = k.sum(-1) / N, k / n
        within = np.where(n > 1, pq * (1 - pq) * n / (n - 1), 0.0) * n
        d = within.sum(-1) / (N * p * (1 - p))
    return np.where(np.isfinite(d), np.clip(d, DEFF_FLOOR, 1.0), 1.0)


def stratified_wilson_bounds(k, n, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson interval of the pooled share on the effective sample size ``N / design_effect`` (per-question counts
    ``(..., Q)``): the interval that reads the questions as the strata they are."""
    k, n = np.asarray(k, float), np.asarray(n, float)
    N = n.sum(-1)
    n_eff = N / design_effect(k, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return wilson_bounds(k.sum(-1) / N * n_eff, n_eff, level)


def stratified_newcombe_bounds(k1, n1, k2, n2, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Newcombe's hybrid interval of ``sum k1 / sum n1 - sum k2 / sum n2`` from the two stratified Wilson intervals."""
    k1, n1, k2, n2 = (np.asarray(x, float) for x in (k1, n1, k2, n2))
    ne1, ne2 = n1.sum(-1) / design_effect(k1, n1), n2.sum(-1) / design_effect(k2, n2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return newcombe_bounds(k1.sum(-1) / n1.sum(-1) * ne1, ne1, k2.sum(-1) / n2.sum(-1) * ne2, ne2, level)


def rate_interval(k, n, level: float = 0.95) -> tuple[list[float | None], str | None]:
    """``(interval, method)`` of a pooled EM rate from per-question counts (Q,), by ``chosen``; ``([None, None],
    None)`` where no interval is calibrated at these counts."""
    k, n = np.asarray(k, float), np.asarray(n, float)
    m = chosen("rate", int(n.min()) if n.size else 0, int(n.size))
    if m == "wilson_strat":
        return _pair(*stratified_wilson_bounds(k, n, level)), m
    if m == "wilson":
        return wilson(int(k.sum()), int(n.sum()), level), m
    return [None, None], None


def difference_interval(
    k1, n1, k2, n2, replies_per_question: int, n_questions: int, level: float = 0.95
) -> tuple[list[float | None], str | None]:
    """``(interval, method)`` of ``sum k1 / sum n1 - sum k2 / sum n2`` from each sample's per-question counts
    (``(Q1,)``, ``(Q2,)``), by ``chosen`` at the design's counts (the questions both samples counted); ``([None,
    None], None)`` where none is calibrated."""
    k1, n1, k2, n2 = (np.asarray(x, float) for x in (k1, n1, k2, n2))
    m = chosen("difference", replies_per_question, n_questions)
    if m == "newcombe_strat":
        return _pair(*stratified_newcombe_bounds(k1, n1, k2, n2, level)), m
    if m == "newcombe":
        return newcombe(int(k1.sum()), int(n1.sum()), int(k2.sum()), int(n2.sum()), level), m
    return [None, None], None


def expanded_level(level: float, n_clusters) -> np.ndarray:
    """The percentile level at which a bootstrap of a mean over ``n_clusters`` has the Student-t interval's width
    (Hesterberg's expanded percentile interval: ``z_{level'} = sqrt(n / (n - 1)) t_{level, n - 1}``)."""
    from scipy.stats import norm

    n = np.asarray(n_clusters, float)
    return 2 * norm.cdf(np.sqrt(n / (n - 1)) * _t(level, n - 1)) - 1


def cluster_difference_bounds(k1, n1, k2, n2, n_boot: int, rng: np.random.Generator, level: float = 0.95):
    """Bootstrap over questions of ``sum k1 / sum n1 - sum k2 / sum n2`` (per-question counts ``(..., Q)``; pass
    ``k2 = n2 = 0`` for one rate), expanded-percentile interval: ``(lo, hi)`` of shape ``(...)``. Questions where
    a model has no counted reply still carry the other model's replies, as in the pooled estimate."""
    k1, n1, k2, n2 = (np.asarray(x, float) for x in (k1, n1, k2, n2))
    q = k1.shape[-1]
    if q < 2:
        nan = np.full(k1.shape[:-1], np.nan)
        return nan, nan
    idx = rng.integers(0, q, size=(*k1.shape[:-1], n_boot, q))

    def total(x):
        return np.take_along_axis(np.broadcast_to(x[..., None, :], idx.shape), idx, -1).sum(-1)

    with np.errstate(invalid="ignore", divide="ignore"):
        s = total(k1) / total(n1)
        if n2.any():
            s = s - total(k2) / total(n2)
    lvl = float(expanded_level(level, q))
    # a resample with an empty denominator has no rate: it is left out, as the pooled estimate would be undefined
    lo, hi = np.nanquantile(s, [(1 - lvl) / 2, (1 + lvl) / 2], axis=-1)
    return lo, hi


def cluster_difference(
    k1, n1, k2=None, n2=None, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> list[float | None]:
    """``cluster_difference_bounds`` for one experiment (per-question counts, shape (Q,)); one rate without
    ``k2, n2``."""
    k2 = np.zeros_like(np.asarray(k1, float)) if k2 is None else k2
    n2 = np.zeros_like(np.asarray(n1, float)) if n2 is None else n2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN resamples: the interval is then undefined
        return _pair(*cluster_difference_bounds(k1, n1, k2, n2, n_boot, np.random.default_rng(seed), level))


def min_detectable_difference(p0: float, n1: int, n2: int, level: float = 0.95, power: float = POWER) -> float | None:
    """Smallest rise ``d`` of a proportion from ``p0`` (sample 2, ``n2`` counts) to ``p0 + d`` (sample 1, ``n1``)
    that a two-sided test at ``1 - level`` detects with probability ``power`` (normal approximation with the pooled
    variance under the null, Fleiss' formula without continuity correction); None when no rise up to 1 is detected."""
    if n1 < 1 or n2 < 1:
        return None
    from scipy.stats import norm

    d = np.linspace(1e-4, 1 - p0, 20001)
    p1 = p0 + d
    pbar = (n1 * p1 + n2 * p0) / (n1 + n2)
    null_sd = np.sqrt(pbar * (1 - pbar) * (1 / n1 + 1 / n2))
    alt_sd = np.sqrt(p1 * (1 - p1) / n1 + p0 * (1 - p0) / n2)
    with np.errstate(invalid="ignore", divide="ignore"):
        achieved = norm.cdf((d - two_sided_z(level) * null_sd) / alt_sd)
    ok = np.flatnonzero(achieved >= power)
    return float(d[ok[0]]) if ok.size else None


def min_detectable_mean(sd: float, n: int, level: float = 0.95, power: float = POWER) -> float | None:
    """Smallest mean change a one-sample t-test at ``1 - level`` (two-sided) detects with probability ``power``
    from ``n`` paired changes of standard deviation ``sd``: ``(t_{level} + t_{power}) sd / sqrt(n)``."""
    if n < 2 or sd is None or not sd == sd:
        return None
    from scipy.stats import t

    return float((_t(level, n - 1) + t.ppf(power, n - 1)) * sd / math.sqrt(n))
