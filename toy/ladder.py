"""A ladder of reweighting references: how much reward can a policy earn that only reweights pi_ref by information
the reference already computes, for four nested kinds of that information?

For a latent-class reward ``r(x, y) = M[c(x), y]`` (``toy.rewards.LatentReward``) the best policy that reweights
pi_ref by information ``I(x)`` tilts pi_ref towards ``argmax_y E[r(x, y) | I(x)]``; in the limit of a full tilt it
earns the accuracy (in reward) of the best predictor of the rewarded output from ``I``. A rung's **ceiling** is that
reward, estimated by cross-fitting (5 folds: every prompt is scored by predictors fitted without it) with the
better of two or more learner families, so a low ceiling is not the artefact of one weak learner:

| rung | information ``I(x)`` the reweighting may use | learners |
|---|---|---|
| 1 | the reference's next-token distribution at the last prompt position, ``log pi_ref(.|x)`` (V numbers) | logistic, boosted trees, kNN |
| 2 | its next-token distributions at every prompt position (L x V numbers) | logistic, boosted trees, kNN (all positions; last 2, 3) |
| 3 | linear read-outs of its activations at the output site (``final_norm``, the unembedding's input), every position | ridge, logistic |
| 4 | linear read-outs of its activations at every residual site (embeddings, every block, ``final_norm``), every position | ridge, logistic |

The rungs nest: each rung's ceiling is the best of its own learners and every lower rung's (rung 3's linear
read-outs reach the logits but not the softmax, so without this a rung could sit below the one under it).
kNN neighbourhoods are shares of the fitted prompts (see ``toy.composition.output_only_reward`` for why). Rungs 3-4
are first reduced to their top ``pca_dims`` principal components (label-free, on all prompts; the variance kept
is reported): a ridge on 7,680 columns is out of reach on two CPU cores, and every rung-3/4 learner sees the
same reduced features. Selecting the best of several learners on the cross-fitted reward is slightly optimistic,
which favours "reweighting", the conservative side for a composition claim.

The verdict for a policy whose exact reward is ``R``: rung ``k`` is **beaten** when ``R - ceiling_k >= margin_k``
(``configs/toy/detector_thresholds.yaml``, fixed before the confirmatory runs); the verdict names the highest
``k`` such that every rung up to ``k`` is beaten: "composition beyond rung k", or "reweighting within rung 1"
when none is, and "inconclusive" when RL moved the reward by less than ``min_reward_gain``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch

from toy.collect import read_residual
from toy.grpo import policy_probs

RUNGS = {
    1: "the reference's next-token distribution at the last prompt position",
    2: "the reference's next-token distributions at every prompt position",
    3: "linear read-outs of the reference's output-site activations (final_norm), every prompt position",
    4: "linear read-outs of the reference's activations at every residual site, every prompt position",
}


@dataclass
class LadderConfig:
    """Pre-registered thresholds and fitting choices of the ladder (values in ``configs/toy/detector_thresholds.yaml``)."""

    margins: list[float] = field(
        default_factory=lambda: [0.05, 0.05, 0.05, 0.05],
        metadata={"help": "Rung k is beaten when reward - ceiling_k >= margins[k - 1]."},
    )
    min_reward_gain: float = field(
        default=0.05, metadata={"help": "Below this reward gain (post - pre) the verdict is inconclusive."}
    )
    folds: int = field(default=5, metadata={"help": "Cross-fitting folds of every ceiling."})
    knn_shares: list[float] = field(
        default_factory=lambda: [0.005, 0.015, 0.05],
        metadata={"help": "kNN neighbourhoods as shares of the fitted prompts."},
    )
    knn_last_positions: list[int] = field(
        default_factory=lambda: [2, 3],
        metadata={"help": "Rung 2 also fits kNN on the outputs of the last j positions only, for each j."},
    )
    pca_dims: int = field(
        default=128, metadata={"help": "Principal components kept of the rung-3 and rung-4 features."}
    )
    ridge_alphas: list[float] = field(
        default_factory=lambda: [1e-3, 1e-1],
        metadata={"help": "Ridge strengths (times the mean feature variance x n) of the rung-3/4 ridge read-outs."},
    )
    logistic_c: float = field(default=100.0, metadata={"help": "Inverse L2 strength of every logistic learner."})

    def __post_init__(self):
        if len(self.margins) != len(RUNGS) or any(m < 0 for m in self.margins):
            raise ValueError(f"margins needs {len(RUNGS)} values >= 0, one per rung; got {self.margins}")
        if self.folds < 2 or self.pca_dims < 1 or not all(0 < s < 0.5 for s in self.knn_shares):
            raise ValueError("folds must be >= 2, pca_dims >= 1, every knn_shares entry in (0, 0.5)")


@torch.no_grad()
def rung_features(model, prompts: torch.Tensor, vocab_size: int, batch_size: int = 2048) -> dict[int, torch.Tensor]:
    """The information of each rung on ``prompts (N, L)``: rung -> ``(N, D_k)`` float32 on CPU (rungs 1-2 are
    log-probabilities over the V process tokens; rungs 3-4 raw residual activations, position-major)."""
    device = next(model.parameters()).device
    logp = torch.cat(
        [
            model(input_ids=prompts[i : i + batch_size].to(device))
            .logits[..., :vocab_size]
            .float()
            .log_softmax(-1)
            .cpu()
            for i in range(0, len(prompts), batch_size)
        ]
    )  # (N, L, V)
    acts = read_residual(model, prompts, batch_size=batch_size)  # site -> (N * L, d), row n * L + t
    N = len(prompts)
    per_site = [a.cpu().float().reshape(N, -1) for a in acts.values()]
    return {1: logp[:, -1], 2: logp.flatten(1), 3: per_site[-1], 4: torch.cat(per_site, 1)}


def exact_output_features(process, beliefs: torch.Tensor) -> dict[int, torch.Tensor]:
    """Rungs 1-2 of the Bayes-optimal reference: the process's own next-token distribution after every prefix,
    ``P(x_{t+1} = x | x_{<=t}) = eta_t T[x] 1`` from the exact beliefs ``(N, L, S)``, as log-probabilities ``(N, V)``
    (rung 1) and ``(N, L * V)`` (rung 2). Their ceilings are what a perfect reference's outputs carry about a latent;
    a trained reference's rungs are measured on its own outputs (its errors can carry more or less)."""
    pred = beliefs.double() @ process.T.sum(-1).T.double()
    logp = pred.clamp_min(1e-12).log().float()
    return {1: logp[:, -1], 2: logp.flatten(1)}


def _pca(X: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mean ``(D,)`` and top-``k`` principal axes ``(D, k)`` of ``X (N, D)``, and the share of variance they keep."""
    mu = X.double().mean(0)
    Xc = X.double() - mu
    if X.shape[1] <= k:
        return mu, torch.eye(X.shape[1], dtype=torch.float64), 1.0
    torch.manual_seed(0)  # pca_lowrank is randomised: the same features give the same components
    _, S, V = torch.pca_lowrank(Xc, q=k, center=False, niter=4)
    return mu, V, float((S**2).sum() / (Xc**2).sum())


def _folds(y: torch.Tensor, k: int, seed: int) -> list[torch.Tensor]:
    """Stratified folds: test indices of each of ``k`` folds."""
    from sklearn.model_selection import StratifiedKFold

    k = max(2, min(k, int(torch.bincount(y).min())))  # y holds classes 0..C-1, each at least once
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [torch.as_tensor(test) for _, test in cv.split(torch.zeros(len(y)), y.numpy())]


def _learners(rung: int, cfg: LadderConfig, n_fit: int, vocab: int) -> dict:
    """name -> (factory, or a float = the closed-form ridge's alpha; trailing columns it reads, or None = all)."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    out = {"logistic": (partial(LogisticRegression, C=cfg.logistic_c, max_iter=3000), None)}
    if rung <= 2:
        # the rewarded output can be a non-linear function of several positions' outputs (XOR of two latents):
        # boosted trees, and kNN on the last few positions, where neighbourhoods stay small in few dimensions
        out["boosted_trees"] = (partial(HistGradientBoostingClassifier, max_iter=200, random_state=0), None)
        out |= {f"knn{s:.1%}": (partial(KNeighborsClassifier, max(1, round(s * n_fit))), None) for s in cfg.knn_shares}
        if rung == 2:
            out |= {
                f"knn{s:.1%}_last{j}": (partial(KNeighborsClassifier, max(1, round(s * n_fit))), j * vocab)
                for j in cfg.knn_last_positions
                for s in cfg.knn_shares[:2]
            }
    else:
        out |= {f"ridge{a:g}": (a, None) for a in cfg.ridge_alphas}
    return out


def _ridge_scores(
    X: torch.Tensor, Y: torch.Tensor, train: torch.Tensor, test: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Class scores of a ridge read-out onto one-hot classes (with intercept), fitted on ``train``, at ``test``."""
    mu, ym = X[train].mean(0), Y[train].mean(0)
    Xt = X[train] - mu
    G = Xt.T @ Xt
    lam = alpha * float(G.diagonal().mean())  # relative strength: the same alpha means the same on any scale
    W = torch.linalg.solve(G + lam * torch.eye(len(G), dtype=G.dtype), Xt.T @ (Y[train] - ym))
    return (X[test] - mu) @ W + ym


def cross_fit(
    X: torch.Tensor,
    latent: torch.Tensor,
    matrix: torch.Tensor,
    table: torch.Tensor,
    rung: int,
    cfg: LadderConfig,
    seed: int = 0,
) -> dict:
    """Cross-fitted reward of each learner's reweighting ``argmax_y r_hat(x, y)`` at one rung: ``X (N, D)`` features,
    ``latent (N,)`` classes, ``matrix (C, V)``, ``table (N, V)`` exact rewards. ``r_hat = P(c | I) @ M`` for
    probabilistic learners, ``onehot(argmax score) @ M`` for ridge. Returns ``{"by_learner", "best", "r_hat"}``."""
    classes, y = torch.unique(latent, return_inverse=True)
    M = matrix[classes]
    folds = _folds(y, cfg.folds, seed)
    n_fit = len(y) - max(len(f) for f in folds)
    X_all = X.double()
    X_all = (X_all - X_all.mean(0)) / X_all.std(0).clamp_min(1e-8)  # one scale for logistic and kNN alike
    Y = torch.nn.functional.one_hot(y, len(classes)).double()
    by, best = {}, None
    for name, (make, cols) in _learners(rung, cfg, n_fit, table.shape[1]).items():
        X = X_all[:, -cols:] if cols else X_all
        r_hat = torch.zeros_like(table)
        for test in folds:
            train = torch.ones(len(y), dtype=torch.bool)
            train[test] = False
            if len(classes) == 1:
                proba = torch.ones(len(test), 1, dtype=torch.float64)
            elif isinstance(make, float):
                s = _ridge_scores(X, Y, train.nonzero().squeeze(1), test, make)
                proba = torch.nn.functional.one_hot(s.argmax(1), len(classes)).double()
            else:
                clf = make().fit(X[train].numpy(), y[train].numpy())
                proba = torch.zeros(len(test), len(classes), dtype=torch.float64)
                proba[:, torch.as_tensor(clf.classes_)] = torch.as_tensor(clf.predict_proba(X[test].numpy()))
            r_hat[test] = proba @ M
        reward = float(table.gather(1, r_hat.argmax(1, keepdim=True)).mean())
        by[name] = reward
        if best is None or reward > best[0]:
            best = (reward, name, r_hat)
    return {"by_learner": by, "best": best[1], "reward": best[0], "r_hat": best[2]}


def ceilings(
    features: dict[int, torch.Tensor],
    latent: torch.Tensor,
    matrix: torch.Tensor,
    table: torch.Tensor,
    cfg: LadderConfig,
    seed: int = 0,
) -> dict:
    """Every rung's cross-fitted ceiling (nested: the best of its own learners and every lower rung's).
    Returns ``{"rungs": {k: {"reward", "own_reward", "learner", "by_learner", "pca_variance_kept", "r_hat"}}}``."""
    rungs, prev = {}, None
    for k in sorted(features):
        X, kept = features[k], 1.0
        if k >= 3:
            mu, V, kept = _pca(X, cfg.pca_dims)
            X = (X.double() - mu) @ V
        fit = cross_fit(X, latent, matrix, table, k, cfg, seed)
        own = {
            "own_reward": fit["reward"],
            "by_learner": fit["by_learner"],
            "pca_variance_kept": kept,
            "information": RUNGS[k],
        }
        if prev is None or fit["reward"] >= prev["reward"]:
            rungs[k] = own | {"reward": fit["reward"], "learner": f"rung{k}:{fit['best']}", "r_hat": fit["r_hat"]}
        else:  # a lower rung's reweighting is also available at this rung
            rungs[k] = own | {"reward": prev["reward"], "learner": prev["learner"], "r_hat": prev["r_hat"]}
        prev = rungs[k]
    return {"rungs": rungs}


def ladder_verdict(reward_pre: float, reward_post: float, ladder: dict, cfg: LadderConfig) -> dict:
    """Excess over each rung and the verdict (module docstring): ``{"verdict", "highest_beaten", "excess", "beaten"}``."""
    excess = {k: reward_post - r["reward"] for k, r in ladder["rungs"].items()}
    beaten = {k: excess[k] >= cfg.margins[k - 1] for k in excess}
    highest = 0
    for k in sorted(beaten):
        if not beaten[k]:
            break
        highest = k
    if reward_post - reward_pre < cfg.min_reward_gain:
        v = "inconclusive"
    elif highest == 0:
        v = "reweighting within rung 1"
    elif highest < len(RUNGS):
        v = f"composition beyond rung {highest} (reweighting within rung {highest + 1})"
    else:
        v = f"composition beyond rung {highest}"
    return {"verdict": v, "highest_beaten": highest, "excess": excess, "beaten": beaten}


def ladder_report(
    pre_model,
    post_model,
    reward,
    prompts: torch.Tensor,
    beliefs: torch.Tensor,
    cfg: LadderConfig,
    seed: int = 0,
    features: dict | None = None,
    ladder: dict | None = None,
) -> dict:
    """The ladder for one (pre-RL, post-RL) pair on ``prompts (N, L)`` with exact ``beliefs``: exact rewards, every
    rung's ceiling, the excesses and the verdict. ``features``/``ladder`` reuse a reference's fitted ladder."""
    V = reward.matrix.shape[1]
    table = reward.table(beliefs)
    pi_ref = policy_probs(pre_model, prompts, V)
    if ladder is None:
        features = features if features is not None else rung_features(pre_model, prompts, V)
        ladder = ceilings(features, reward.latent(beliefs), reward.matrix, table, cfg, seed)
    pre = float((pi_ref * table).sum(1).mean())
    post = float((policy_probs(post_model, prompts, V) * table).sum(1).mean()) if post_model is not None else pre
    return {
        "reward_pre": pre,
        "reward_post": post,
        "reward_max": float(table.max(1).values.mean()),
        "ceilings": {k: {kk: vv for kk, vv in r.items() if kk != "r_hat"} for k, r in ladder["rungs"].items()},
        **ladder_verdict(pre, post, ladder, cfg),
    }


# --------------------------------------------------------------------------- controls whose answer is known


def fit_predict(
    X_fit: torch.Tensor,
    latent_fit: torch.Tensor,
    X_apply: torch.Tensor,
    learner: str,
    matrix: torch.Tensor,
    cfg: LadderConfig,
) -> torch.Tensor:
    """``r_hat (N_apply, V)`` of ``learner`` (a ceiling's ``"rung<k>:<name>"``) fitted on every prompt of one set
    (``X_fit`` of rung k) and applied to another: a reweighting built from rung-k information that never saw the
    prompts it is judged on."""
    rung, name = int(learner.split(":")[0][4:]), learner.split(":")[1]
    classes, y = torch.unique(latent_fit, return_inverse=True)
    Xf, Xa = X_fit.double(), X_apply.double()
    if rung >= 3:
        mu, V, _ = _pca(Xf, cfg.pca_dims)
        Xf, Xa = (Xf - mu) @ V, (Xa - mu) @ V
    m, sd = Xf.mean(0), Xf.std(0).clamp_min(1e-8)
    Xf, Xa = (Xf - m) / sd, (Xa - m) / sd
    make, cols = _learners(rung, cfg, len(y), matrix.shape[1])[name]
    if cols:
        Xf, Xa = Xf[:, -cols:], Xa[:, -cols:]
    if len(classes) == 1:
        proba = torch.ones(len(Xa), 1, dtype=torch.float64)
    elif isinstance(make, float):
        Y = torch.nn.functional.one_hot(y, len(classes)).double()
        X = torch.cat([Xf, Xa])
        s = _ridge_scores(
            X, torch.cat([Y, Y[:1].expand(len(Xa), -1)]), torch.arange(len(Xf)), torch.arange(len(Xf), len(X)), make
        )
        proba = torch.nn.functional.one_hot(s.argmax(1), len(classes)).double()
    else:
        clf = make().fit(Xf.numpy(), y.numpy())
        proba = torch.zeros(len(Xa), len(classes), dtype=torch.float64)
        proba[:, torch.as_tensor(clf.classes_)] = torch.as_tensor(clf.predict_proba(Xa.numpy()))
    return proba @ matrix[classes]


def hard_tilt(pi_ref: torch.Tensor, r_hat: torch.Tensor) -> torch.Tensor:
    """pi_ref restricted to ``argmax_y r_hat(x, y)`` (the full tilt towards the predicted rewarded output): ``(N, V)``."""
    top = torch.nn.functional.one_hot(r_hat.argmax(1), r_hat.shape[1]).double()
    q = pi_ref.clamp_min(1e-12) * top
    return q / q.sum(1, keepdim=True)


def latent_mixture(pi_ref: torch.Tensor, table: torch.Tensor, target: float) -> tuple[torch.Tensor, float]:
    """``(1 - lam) pi_ref + lam pi_opt`` with ``pi_opt`` = pi_ref restricted to the top-reward outputs (it reads the
    latent itself), ``lam`` set so the exact expected reward is ``target`` (clipped to [0, 1]): a policy that uses
    the latent but earns exactly as much as asked. Returns the policy and ``lam``."""
    top = (table == table.max(1, keepdim=True).values).double()
    opt = pi_ref.clamp_min(1e-12) * top
    opt = opt / opt.sum(1, keepdim=True)
    r_ref, r_opt = float((pi_ref * table).sum(1).mean()), float((opt * table).sum(1).mean())
    lam = min(1.0, max(0.0, (target - r_ref) / max(r_opt - r_ref, 1e-12)))
    return (1 - lam) * pi_ref + lam * opt, lam


def control_policies(
    pi_ref: torch.Tensor,
    table: torch.Tensor,
    other_ladder: dict,
    other_features: dict,
    other_latent: torch.Tensor,
    features: dict,
    matrix: torch.Tensor,
    cfg: LadderConfig,
    lead: float = 0.10,
    supervised: tuple[torch.Tensor, float] | None = None,
) -> list[tuple[str, torch.Tensor, dict]]:
    """The controls of ``calibration_controls`` as policies: ``(name, pi (N, V), known {rung: bool | None})`` each,
    built on these prompts from an independent prompt set's fitted learners and ceilings (``other_*``)."""
    K = sorted(other_ladder["rungs"])
    other_ceiling = {k: other_ladder["rungs"][k]["reward"] for k in K}
    policies = [("reference", pi_ref, {k: False for k in K})]
    for j in K:
        learner = other_ladder["rungs"][j]["learner"]
        src = int(learner.split(":")[0][4:])  # the nested ceiling may come from a lower rung's learner
        r_hat = fit_predict(other_features[src], other_latent, features[src], learner, matrix, cfg)
        policies.append((f"reweight_rung{j}", hard_tilt(pi_ref, r_hat), {k: (False if k >= j else None) for k in K}))
    for j in K:
        policies.append(
            (
                f"capped_rung{j}",
                latent_mixture(pi_ref, table, other_ceiling[j] - 0.01)[0],
                {k: (False if k >= j else None) for k in K},
            )
        )
        above, lam = latent_mixture(pi_ref, table, other_ceiling[j] + lead)
        # a ceiling within ``lead`` of the best reward leaves no room: the mixture stops at the optimum, short of
        # its target, and its answer is no longer known
        policies.append((f"above_rung{j}", above, {k: (True if k <= j and lam < 1 else None) for k in K}))
    r_max = float(table.max(1).values.mean())
    policies.append(
        (
            "optimum",
            latent_mixture(pi_ref, table, r_max)[0],
            {k: (True if other_ceiling[k] <= r_max - lead else None) for k in K},
        )
    )
    if supervised is not None:
        pi, r_other = supervised
        policies.append(
            (
                "supervised",
                pi,
                {
                    k: (
                        False
                        if r_other <= other_ceiling[k] - 0.01
                        else True
                        if r_other >= other_ceiling[k] + lead
                        else None
                    )
                    for k in K
                },
            )
        )
    return policies


def calibration_controls(
    pi_ref: torch.Tensor,
    table: torch.Tensor,
    ladder: dict,
    other_ladder: dict,
    other_features: dict,
    other_latent: torch.Tensor,
    features: dict,
    matrix: torch.Tensor,
    cfg: LadderConfig,
    lead: float = 0.10,
    supervised: tuple[torch.Tensor, float] | None = None,
) -> list[dict]:
    """Controls whose per-rung answer is known by construction, judged against ``ladder`` (ceilings cross-fitted on
    these prompts) but built from an independent prompt set (``other_*``: its fitted learners and its ceilings;
    ``control_policies``):

    - ``reference``: pi_ref itself -- beats no rung;
    - ``reweight_rung<j>``: pi_ref fully tilted by rung j's best learner fitted on the other set -- beats no rung >= j;
    - ``capped_rung<k>``: the latent mixture earning the other set's ceiling_k - 0.01 -- uses the latent, beats no rung >= k;
    - ``above_rung<k>``: the latent mixture earning the other set's ceiling_k + ``lead`` -- beats every rung <= k;
    - ``optimum``: pi_ref restricted to the top-reward outputs -- beats every rung whose other-set ceiling is
      at least ``lead`` below it;
    - ``supervised`` (if given): the supervised composed policy (``toy.composition.supervised_control``, fine-tuned
      onto the optimum on prompts of neither set), as ``(its policy (N, V) on these prompts, its exact reward on the
      other set)``. It reads the latent by construction, but that does not fix its reward, and the ladder judges
      reward: its answer is known only where its other-set reward fixes it -- not beyond rung k when that reward is
      at most the other set's ceiling_k - 0.01 (as ``capped``), beyond every rung k whose other-set ceiling it
      exceeds by ``lead`` (as ``above``), unknown in between.

    The controls do not depend on the margins (``lead`` is fixed), so one calibration serves any margins.

    Returns one row per control: ``{"control", "reward", "known": {k: bool | None}, "beaten": {k: bool}}``."""
    rows = []
    for name, pi, known in control_policies(
        pi_ref, table, other_ladder, other_features, other_latent, features, matrix, cfg, lead, supervised
    ):
        reward = float((pi * table).sum(1).mean())
        v = ladder_verdict(float((pi_ref * table).sum(1).mean()), reward, ladder, cfg)
        rows.append({"control": name, "reward": reward, "known": known, "beaten": v["beaten"], "verdict": v["verdict"]})
    return rows
