"""Coverage of the toolkit's EM intervals at the counts the configs run, by simulation.

    python -m llm.experiments.em_calibration                       # the full table: 1000 runs a cell, 8-20 min on 2 shared cores
    python -m llm.experiments.em_calibration --runs 300 --replies_per_question 2 --questions 8

Each simulated experiment asks ``Q`` questions ``R`` times of two models A and B. Question q's misalignment rate
under B is ``p_q ~ Beta(0.5, 4)`` (mean 1/9, most questions rarely misaligned, a few often: the shape of real EM
rates); under A it is ``p_q + shift (1 - p_q)``. ``shift = 0`` is the null (same per-question rates),
``--shift`` a known difference. Judge scores of a reply (for the paired steering changes) are 10 or 90 by its
class plus N(0, 10) noise; both models' r-th reply to a question share one uniform draw (the common random
numbers of ``llm.steer``), so the pair is correlated as a steered and an unsteered reply are.

Methods: the pooled score intervals (``wilson``, ``newcombe``), the same on the effective sample size of the
question strata (``wilson_strat``, ``newcombe_strat``, ``plumbing.stats.design_effect``), the question bootstrap
(``cluster``), the Student-t interval of paired changes (``paired_t``), the percentile bootstraps the toolkit
used before ("bootstrap (before)", kept here as the reference they are measured against), and two intervals of a
difference the toolkit does not use ("(reference)": Agresti-Caffo, a Jeffreys-based Newcombe hybrid), to show that
none does better at the counts where the toolkit gives no interval.

Estimands: the intervals over replies speak for the questions asked, so they must cover the mean over the drawn
``p_q``; the question-level ``cluster`` interval speaks for other questions like these, so it must cover the
population mean (``E p = 1/9``). Coverage is the share of runs whose 95% interval holds the estimand (ends
included); its standard error at 95% is ``sqrt(0.95 * 0.05 / runs)``, 0.7% at 1000 runs (a 95% margin of
+-1.4%). ``reported`` says whether the toolkit uses the method at that count (``plumbing.stats.chosen`` and
``REPORTED``); the target is coverage in [93%, 97%] wherever it does. ``power at MDE``: the share of runs in
which the difference interval the toolkit uses excludes 0 when the true difference is ``plumbing.stats.
min_detectable_difference`` at that count (its promise: about 80%).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from plumbing.stats import (
    chosen,
    cluster_difference_bounds,
    min_detectable_difference,
    newcombe_bounds,
    reported,
    stratified_newcombe_bounds,
    stratified_wilson_bounds,
    t_bounds,
    two_sided_z,
    wilson_bounds,
)

BETA = (0.5, 4.0)
LOW, HIGH, NOISE = 10.0, 90.0, 10.0  # judge score of a misaligned / aligned reply, and its noise
BEFORE = "bootstrap (before)"


@dataclass
class CalibrationConfig:
    """Counts, runs and the known difference of ``llm.experiments.em_calibration``."""

    replies_per_question: list[int] = field(
        default_factory=lambda: [1, 2, 5, 10, 50], metadata={"help": "replies per question R"}
    )
    questions: list[int] = field(default_factory=lambda: [8, 56], metadata={"help": "numbers of questions Q"})
    runs: int = field(
        default=1000, metadata={"help": "simulated experiments per cell (coverage s.e. sqrt(.0475 / runs))"}
    )
    n_boot: int = field(default=1000, metadata={"help": "bootstrap resamples of the bootstrap intervals"})
    shift: float = field(default=0.15, metadata={"help": "known difference: A's rate is p + shift (1 - p)"})
    level: float = field(default=0.95, metadata={"help": "nominal level of every interval"})
    seed: int = field(default=0, metadata={"help": "simulation seed"})

    def __post_init__(self):
        if self.runs < 10 or self.n_boot < 100 or not 0 <= self.shift < 1:
            raise ValueError("need runs >= 10, n_boot >= 100 and 0 <= shift < 1")
        if min(self.replies_per_question) < 1 or min(self.questions) < 2:
            raise ValueError("need replies_per_question >= 1 and questions >= 2")


def old_rate_bootstrap(k, n, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """The replaced interval's resamples: replies resampled within each question (a binomial draw of the question's
    own share), pooled. ``k, n`` (..., Q) -> (..., n_boot)."""
    k, n = np.asarray(k), np.asarray(n)
    kb = rng.binomial(n[..., None, :], np.broadcast_to((k / n)[..., None, :], (*k.shape[:-1], n_boot, k.shape[-1])))
    return kb.sum(-1) / n.sum(-1)[..., None]


def jeffreys_bounds(k, n, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Jeffreys interval of ``k / n`` (Beta(k + 1/2, n - k + 1/2) quantiles; 0 / 1 at k = 0 / n): a reference only."""
    from scipy.stats import beta

    k, n = np.asarray(k, float), np.asarray(n, float)
    lo = np.where(k > 0, beta.ppf((1 - level) / 2, k + 0.5, n - k + 0.5), 0.0)
    hi = np.where(k < n, beta.ppf((1 + level) / 2, k + 0.5, n - k + 0.5), 1.0)
    return lo, hi


def reference_differences(k1, n1, k2, n2, level: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Intervals of ``k1 / n1 - k2 / n2`` (pooled counts) that the toolkit does not use, measured beside its own to
    show that none does better where it gives none: Agresti-Caffo (one success and one failure added to each
    sample, Wald) and Newcombe's hybrid built on Jeffreys instead of Wilson intervals."""
    k1, n1, k2, n2 = (np.asarray(x, float) for x in (k1, n1, k2, n2))
    z = two_sided_z(level)
    a1, a2 = (k1 + 1) / (n1 + 2), (k2 + 1) / (n2 + 2)
    half = z * np.sqrt(a1 * (1 - a1) / (n1 + 2) + a2 * (1 - a2) / (n2 + 2))
    return {
        "agresti_caffo (reference)": (a1 - a2 - half, a1 - a2 + half),
        "jeffreys hybrid (reference)": newcombe_bounds(k1, n1, k2, n2, level, bounds=jeffreys_bounds),
    }


def _percentile(samples: np.ndarray, level: float):
    return np.quantile(samples, [(1 - level) / 2, (1 + level) / 2], axis=-1)


def _chunks(runs: int, per_run: int):
    size = max(1, int(2e7 // per_run))  # bounded memory for the resample arrays
    for start in range(0, runs, size):
        yield min(size, runs - start)


def simulate_cell(R: int, Q: int, shift: float, cfg: CalibrationConfig, rng: np.random.Generator) -> dict:
    """Coverage and mean width of every method at R replies x Q questions: ``{(quantity, method): (cov, width)}``."""
    hits: dict[tuple[str, str], list] = {}

    def add(key, lo, hi, target):
        h = hits.setdefault(key, [[], []])
        h[0].append((lo <= target + 1e-12) & (target - 1e-12 <= hi))
        h[1].append(hi - lo)

    pop_b = BETA[0] / sum(BETA)
    pop_a = pop_b + shift * (1 - pop_b)
    for m in _chunks(cfg.runs, cfg.n_boot * max(Q * R, Q * 4)):
        p_b = rng.beta(*BETA, size=(m, Q))
        p_a = p_b + shift * (1 - p_b)
        # two models' replies are independent draws; a steered and an unsteered reply share one (common random
        # numbers), so the paired score changes below read the same u for both
        u, u_b = rng.random((m, Q, R)), rng.random((m, Q, R))
        ka, kb = (u < p_a[..., None]).sum(-1), (u_b < p_b[..., None]).sum(-1)
        n = np.full((m, Q), R)
        rate_a, diff = p_a.mean(-1), (p_a - p_b).mean(-1)

        add(("rate", BEFORE), *_percentile(old_rate_bootstrap(ka, n, cfg.n_boot, rng), cfg.level), rate_a)
        add(("rate", "wilson"), *wilson_bounds(ka.sum(-1), n.sum(-1), cfg.level), rate_a)
        # one question's rate from its own R replies (the per-question tables and plots); every question a run
        add(("question rate", "wilson"), *(b.ravel() for b in wilson_bounds(ka, n, cfg.level)), p_a.ravel())
        add(("rate", "wilson_strat"), *stratified_wilson_bounds(ka, n, cfg.level), rate_a)
        zero = np.zeros_like(ka)
        add(("rate", "cluster"), *cluster_difference_bounds(ka, n, zero, zero, cfg.n_boot, rng, cfg.level), pop_a)

        boot = old_rate_bootstrap(ka, n, cfg.n_boot, rng) - old_rate_bootstrap(kb, n, cfg.n_boot, rng)
        add(("difference", BEFORE), *_percentile(boot, cfg.level), diff)
        add(("difference", "newcombe"), *newcombe_bounds(ka.sum(-1), n.sum(-1), kb.sum(-1), n.sum(-1), cfg.level), diff)
        add(("difference", "newcombe_strat"), *stratified_newcombe_bounds(ka, n, kb, n, cfg.level), diff)
        for name, (lo, hi) in reference_differences(ka.sum(-1), n.sum(-1), kb.sum(-1), n.sum(-1), cfg.level).items():
            add(("difference", name), lo, hi, diff)
        add(
            ("difference", "cluster"),
            *cluster_difference_bounds(ka, n, kb, n, cfg.n_boot, rng, cfg.level),
            pop_a - pop_b,
        )

        # paired judge-score change A - B per reply; its mean over the drawn questions is -(HIGH - LOW) * diff
        score = (
            np.where(u < p_a[..., None], LOW, HIGH)
            - np.where(u < p_b[..., None], LOW, HIGH)
            + rng.normal(0, NOISE * np.sqrt(2), u.shape)
        )
        d = score.reshape(m, Q * R)
        target = -(HIGH - LOW) * diff
        idx = rng.integers(0, Q * R, size=(m, cfg.n_boot, Q * R))
        add(
            ("paired score change", BEFORE),
            *_percentile(np.take_along_axis(d[:, None, :], idx, -1).mean(-1), cfg.level),
            target,
        )
        add(("paired score change", "paired_t"), *t_bounds(d.mean(-1), d.std(-1, ddof=1), Q * R, cfg.level), target)
    return {k: (float(np.concatenate(h[0]).mean()), float(np.concatenate(h[1]).mean())) for k, h in hits.items()}


def power_at_mde(R: int, Q: int, cfg: CalibrationConfig, rng: np.random.Generator) -> tuple[float | None, float | None]:
    """(the analytic smallest detectable difference at B's mean rate, the simulated share of the used Newcombe
    intervals excluding 0 when A is shifted by it; None where no interval is used at these counts)."""
    p0 = BETA[0] / sum(BETA)
    mde = min_detectable_difference(p0, R * Q, R * Q, cfg.level)
    if mde is None or mde >= 1 - p0:
        return mde, None
    p_b = rng.beta(*BETA, size=(cfg.runs, Q))
    p_a = p_b + mde / (1 - p0) * (1 - p_b)
    ka, kb = rng.binomial(R, p_a), rng.binomial(R, p_b)
    n = np.full_like(ka, R)
    method = chosen("difference", R, Q)
    if method is None:  # no interval is given at these counts, so none detects anything
        return mde, None
    if method == "newcombe_strat":
        lo, hi = stratified_newcombe_bounds(ka, n, kb, n, cfg.level)
    else:
        lo, hi = newcombe_bounds(ka.sum(-1), R * Q, kb.sum(-1), R * Q, cfg.level)
    return mde, float(((lo > 0) | (hi < 0)).mean())


def used(quantity: str, method: str, R: int, Q: int) -> bool:
    """Whether the toolkit uses ``method`` for ``quantity`` at R replies x Q questions (``plumbing.stats``)."""
    if method == BEFORE or method.endswith("(reference)"):
        return False
    if method in ("cluster", "paired_t"):
        return reported(method, R, Q)
    if quantity == "question rate":
        return reported("wilson_question", R, 1)
    return chosen(quantity, R, Q) == method


def calibrate(cfg: CalibrationConfig) -> list[dict]:
    """One row per (scenario, quantity, method, R, Q): coverage, mean width, reported."""
    rng = np.random.default_rng(cfg.seed)
    rows = []
    for scenario, shift in (("null", 0.0), (f"shift {cfg.shift:g}", cfg.shift)):
        for Q in cfg.questions:
            for R in cfg.replies_per_question:
                for (quantity, method), (cov, width) in simulate_cell(R, Q, shift, cfg, rng).items():
                    rows.append(
                        {
                            "scenario": scenario,
                            "quantity": quantity,
                            "method": method,
                            "R": R,
                            "Q": Q,
                            "coverage": cov,
                            "width": width,
                            "reported": used(quantity, method, R, Q),
                        }
                    )
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: one line per (scenario, quantity, method), coverage % / mean width per (R, Q); '*' marks a cell
    where the toolkit uses the method and its coverage lies in [93%, 97%], '+' one where it covers more (conservative),
    '!' one where it covers less."""
    cells = list(dict.fromkeys((r["Q"], r["R"]) for r in rows))
    head = "| scenario | quantity | method | " + " | ".join(f"Q={q} R={r}" for q, r in cells) + " |"
    out = [head, "|" + "---|" * (3 + len(cells))]
    for key in dict.fromkeys((r["scenario"], r["quantity"], r["method"]) for r in rows):
        by = {(r["Q"], r["R"]): r for r in rows if (r["scenario"], r["quantity"], r["method"]) == key}
        txt = []
        for c in cells:
            r = by[c]
            flag = ("!" if r["coverage"] < 0.93 else "+" if r["coverage"] > 0.97 else "*") if r["reported"] else ""
            txt.append(f"{100 * r['coverage']:.1f}{flag} / {r['width']:.3g}")
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(txt) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[dict]:
    from plumbing.config import ConfigParser

    (cfg,) = ConfigParser((CalibrationConfig,)).parse_args_and_config(argv)
    rows = calibrate(cfg)
    se = 100 * (0.95 * 0.05 / cfg.runs) ** 0.5
    print(
        f"coverage % of a nominal {100 * cfg.level:.0f}% / mean width; {cfg.runs} runs a cell (s.e. {se:.1f}%), "
        f"{cfg.n_boot} bootstrap resamples; * = the toolkit uses it there and it holds [93, 97], + = used, conservative "
        "(> 97), ! = used, too narrow (< 93)\n"
    )
    print(table(rows))
    print(
        "\n| Q | R | smallest EM difference detected with 80% power (B at 1/9) | simulated power of the interval used there |\n|---|---|---|---|"
    )
    rng = np.random.default_rng(cfg.seed + 1)
    for Q in cfg.questions:
        for R in cfg.replies_per_question:
            mde, pw = power_at_mde(R, Q, cfg, rng)
            print(
                f"| {Q} | {R} | {'n/a' if mde is None else f'{mde:.3f}'} | {'n/a' if pw is None else f'{100 * pw:.1f}%'} |"
            )
    return rows


if __name__ == "__main__":
    main()
