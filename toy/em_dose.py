"""Dose-response of a narrow fine-tune and the pre-registered decision rules of the toy EM chain.

A narrow fine-tune (or a steering strength sweep) is a *trajectory* of misaligned rates ``(narrow_t, broad_t)``
(inside / outside the fine-tuned slice) from ``(narrow_0, broad_0)`` before it. Its in-slice shift is the share of
the room it used, ``u_t = (narrow_t - narrow_0) / (1 - narrow_0)``; transfer at a matched shift ``u*`` is the
broad rise over the narrow rise where the trajectory first reaches ``u*`` (linear interpolation between the two
points around it). Comparing arms at the same ``u*`` keeps endpoints at the ceiling (``u ~ 1``) out of it.

Rules: a claim is a mapping (from the experiment's YAML) naming a statistic and two conditions, e.g.
``{"test": "transfer", "world": "tagless", "stage": "none", "method": "full", "shift": 0.5, "supported": "ci_high <=
0.2", "contradicted": "ci_low >= 0.5"}``; ``decide`` reads the conditions on the statistic's mean and 95% CI
(``plumbing.stats.mean_ci`` over seeds): supported / contradicted / undecided.
"""

from __future__ import annotations

import math
import operator

import torch

from plumbing.stats import mean_ci

NAN = float("nan")


def at_shifts(narrow: list[float], broad: list[float], levels: list[float]) -> dict[str, dict]:
    """Transfer where the trajectory ``narrow[t], broad[t]`` (index 0: before) first reaches each in-slice shift.

    Returns ``{str(level): {"transfer", "broad_effect", "narrow_effect", "t"}}`` (``t``: the fractional trajectory
    index of the crossing); all NaN for a level never reached (the fine-tune stopped short of it)."""
    n0, b0 = narrow[0], broad[0]
    room = 1 - n0
    out = {}
    for level in levels:
        row = {"transfer": NAN, "broad_effect": NAN, "narrow_effect": NAN, "t": NAN}
        if room > 0:
            u = [(n - n0) / room for n in narrow]
            # u[0] = 0 < level, so the first t with u[t] >= level has u[t - 1] < level
            t = next((t for t in range(1, len(u)) if u[t] >= level), None)
            if t is not None:
                w = (level - u[t - 1]) / (u[t] - u[t - 1])
                db = broad[t - 1] + w * (broad[t] - broad[t - 1]) - b0
                dn = level * room
                row = {"transfer": db / dn, "broad_effect": db, "narrow_effect": dn, "t": t - 1 + w}
        out[str(level)] = row
    return out


def capability_kl(p_ref: torch.Tensor, p: torch.Tensor, n_copies: int, V: int) -> float:
    """Mean KL(ref || model) in nats between the *capability marginals* of two models' next-token distributions
    ``(N, >= n_copies * V)`` (copy-major joint tokens; extra special tokens ignored): how far a stage moved what the
    model predicts about the capability, whatever it did to the copies."""

    def marg(q):
        q = q[:, : n_copies * V].double().reshape(-1, n_copies, V).sum(1)
        return q / q.sum(-1, keepdim=True)

    a, b = marg(p_ref), marg(p)
    return float((a * (a.clamp_min(1e-30).log() - b.clamp_min(1e-30).log())).sum(-1).mean())


# --------------------------------------------------------------------------- pre-registered rules

OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
STATS = ("mean", "ci_low", "ci_high")
TESTS = ("transfer", "difference")


def parse_condition(text: str) -> list[list[tuple[str, str, float]]]:
    """``"ci_low > -0.1 and ci_high < 0.1"`` -> ``[[("ci_low", ">", -0.1), ("ci_high", "<", 0.1)]]``: a list of
    alternatives (joined by ``or``), each a list of terms that must all hold (joined by ``and``)."""
    alternatives = []
    for alt in str(text).split(" or "):
        terms = []
        for part in alt.split(" and "):
            bits = part.split()
            if len(bits) != 3 or bits[0] not in STATS or bits[1] not in OPS:
                raise ValueError(
                    f"condition {text!r}: each term must read '<{'|'.join(STATS)}> <{'|'.join(OPS)}> <number>', "
                    "terms joined by ' and ' / ' or '"
                )
            terms.append((bits[0], bits[1], float(bits[2])))
        alternatives.append(terms)
    return alternatives


def check_claims(claims: dict) -> None:
    """Fail early on a malformed rule (before any cell runs)."""
    for name, c in claims.items():
        if not isinstance(c, dict) or c.get("test") not in TESTS:
            raise ValueError(f"claim {name!r}: needs test: one of {TESTS}")
        missing = [k for k in ("world", "stage", "method", "shift", "supported", "contradicted") if k not in c]
        if c["test"] == "difference" and "base" not in c:
            missing.append("base")
        if missing:
            raise ValueError(f"claim {name!r}: missing {missing}")
        if c["test"] == "difference" and not (isinstance(c["base"], dict) and {"stage", "method"} <= set(c["base"])):
            raise ValueError(f"claim {name!r}: base must give stage and method (the arm subtracted, seed by seed)")
        parse_condition(c["supported"])
        parse_condition(c["contradicted"])


def decide(stat: dict, claim: dict) -> str:
    """``supported`` / ``contradicted`` / ``undecided`` for ``stat`` (``mean_ci``'s ``{"mean", "ci", "n"}``) under
    ``claim``'s conditions. Undecided too when the statistic is missing (NaN: no seed reached the shift) or has no
    CI (fewer than 2 seeds)."""
    vals = {"mean": stat["mean"], "ci_low": stat["ci"][0], "ci_high": stat["ci"][1]}
    if any(not math.isfinite(v) for v in vals.values()):
        return "undecided"

    def holds(text):
        return any(all(OPS[op](vals[key], x) for key, op, x in alt) for alt in parse_condition(text))

    sup, con = holds(claim["supported"]), holds(claim["contradicted"])
    if sup and con:
        raise ValueError(
            f"the claim's conditions overlap at {vals}: supported {claim['supported']!r} and contradicted "
            f"{claim['contradicted']!r} both hold; make them exclusive"
        )
    return "supported" if sup else "contradicted" if con else "undecided"


def per_seed(cells: list[dict], world: str, stage: str, method: str, shift: float) -> dict[int, float]:
    """Transfer at ``shift`` of ``(stage, method)`` in each cell of ``world`` (a ``world_id``), by seed; method
    ``bayes`` is the world's exact in-context transfer (``toy.alignment.bayes_transfer``, one number per cell)."""
    out = {}
    for c in cells:
        s = c.get("safety", {}).get(stage, {})
        if c.get("world_id") != world:
            continue
        if method == "bayes":
            out[c["seed"]] = c["bayes"]["transfer"]
        elif method in s.get("shifts", {}):
            out[c["seed"]] = s["shifts"][method][str(shift)]["transfer"]
    return out


def statistic(cells: list[dict], claim: dict, world: str, stage: str, method: str) -> dict:
    """The claim's statistic over seeds in ``world`` for ``(stage, method)``: mean and 95% CI of the transfer
    (``transfer``) or of the paired difference from the ``base`` arm, seed by seed (``difference``; a base stage or
    method ``same`` is this row's); seeds missing either arm or never reaching the shift are left out (``n`` says
    how many remain)."""
    a = per_seed(cells, world, stage, method, claim["shift"])
    if claim["test"] == "transfer":
        return mean_ci([v for v in a.values() if math.isfinite(v)])
    base = {
        k: (here if claim["base"][k] == "same" else claim["base"][k])
        for k, here in (("stage", stage), ("method", method))
    }
    b = per_seed(cells, world, base["stage"], base["method"], claim["shift"])
    return mean_ci([a[s] - b[s] for s in a if s in b and math.isfinite(a[s]) and math.isfinite(b[s])])


def as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def judge(cells: list[dict], claims: dict, matched: dict[str, bool] | None = None) -> list[dict]:
    """Every claim, expanded over its ``world``, ``stage`` and ``method`` lists: one row per (claim, world, stage, method) with the
    statistic, the verdict, the toy's prediction (``toy_predicts``) and, for a control (``expect``: "supported",
    "not supported", ...), whether the verdict is the one the control must give. A claim with
    ``requires_matched: true`` is undecided in a world whose SFT and GRPO stages are not matched (``matched``)."""
    rows = []
    for name, c in claims.items():
        for world, stage, method in (
            (w, s, m) for w in as_list(c["world"]) for s in as_list(c["stage"]) for m in as_list(c["method"])
        ):
            stat = statistic(cells, c, world, stage, method)
            v = decide(stat, c)
            if c.get("requires_matched") and not (matched or {}).get(world, False):
                v = "undecided (stages not matched)"
            row = {
                "claim": name,
                "world": world,
                "stage": stage,
                "method": method,
                "shift": c["shift"],
                "test": c["test"],
                "base": c.get("base"),
                "stat": stat,
                "verdict": v,
                "supported_if": c["supported"],
                "contradicted_if": c["contradicted"],
                "says": c.get("says", ""),
                "toy_predicts": c.get("toy_predicts"),
            }
            if "expect" in c:
                exp = str(c["expect"])
                row["control_ok"] = v != exp[4:] if exp.startswith("not ") else v == exp
                row["expect"] = exp
            rows.append(row)
    return rows
