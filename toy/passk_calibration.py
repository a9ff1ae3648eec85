"""Calibration of the three pass@k-side verdicts (``probes.passk``) where the truth is known: policies over a finite
set of replies ("atoms") with exact probabilities, sampled at a report's prompt and sample counts.

A control is ``(pi_ref, pi_post, correct)``, each ``(N, A)``: the reference's and the post-RL policy's exact
distributions over A replies on N prompts, and which replies are correct. The truth the outside-support verdict
claims, per prompt: ``T(x) = pi_ref(correct replies the post-RL policy gives) < 1 / K`` on a prompt the post-RL
policy solves (``p_post > 0``; ``toy.reweighting.outside_support_exact``). ``sample_run`` draws what a report sees (``n`` replies per prompt from each policy,
on ``n_prompts`` prompts drawn from the N), ``judge_run`` applies the report's verdicts, ``confusion`` counts calls
against the truth over many runs.

Controls (``controls``; every reference is top-p truncated, so "zero reference probability" exists):

* **identical**: ``pi_post = pi_ref``;
* **reweight beta=b**: ``pi_ref exp(b r) / Z`` -- the KL-regularised RL optimum, the same support;
* **narrow T=t**: ``pi_ref^(1/t)`` renormalised -- a sharpening that narrows (mass leaves the reference's less
  likely replies, correct or not; the same support);
* **new capability**: on a quarter of the prompts the only correct reply is one the reference gives probability
  exactly 0 (or 1e-7, outside at K = 1e5 without being impossible), which the post-RL policy gives with probability
  ``q``; elsewhere ``reweight beta=3``;
* **latent optimum** (families whose truncated reference cannot solve some prompts): the full-support reference
  restricted to the correct replies, against the truncated reference;
* **format collapse** (LLM-shaped references): the post-RL policy answers in the correct format the reference likes
  least. Truly outside where that format's reference probability is < 1/K, although the reference answers the prompt
  correctly in other formats: the verdict is about the post-RL policy's replies, not about every correct reply.

The toy families' exact references are the process's own next-token distribution after each prompt (the Bayes-
optimal pre-trained model, from the exact belief) with one-token replies; ``llm_like`` builds references shaped like
the LLM reports' (per-prompt success log-uniform, the correct mass split over several reply formats).
"""

from __future__ import annotations

import torch

from probes.passk import PassKConfig, outside_support, pass_at_k, passk_verdict, wider_verdict
from toy.reweighting import outside_support_exact, with_temperature


def reweight(pi: torch.Tensor, correct: torch.Tensor, beta: float) -> torch.Tensor:
    """``pi exp(beta r) / Z`` with ``r`` = 1 on correct replies: ``(N, A)``."""
    w = pi.double() * torch.exp(beta * correct.double())
    return w / w.sum(1, keepdim=True)


def new_capability(pi_ref: torch.Tensor, correct: torch.Tensor, q: float, eps: float = 0.0, seed: int = 0) -> tuple:
    """One extra reply, which the reference gives probability ``eps`` (0: provably never) and the post-RL policy
    ``q``; on a random quarter of the prompts it is the only correct reply. Elsewhere the post-RL policy is
    ``reweight(beta=3)``."""
    N = len(pi_ref)
    cap = torch.rand(N, generator=torch.Generator().manual_seed(seed)) < 0.25
    ref_x = torch.cat([pi_ref.double() * (1 - eps * cap[:, None]), eps * cap[:, None].double()], 1)
    cor_x = torch.cat([correct & ~cap[:, None], cap[:, None]], 1)
    post_x = reweight(ref_x, cor_x, 3.0)
    post_x[cap] = torch.cat(
        [(1 - q) * pi_ref[cap].double(), torch.full((int(cap.sum()), 1), q, dtype=torch.float64)], 1
    )
    return ref_x, post_x, cor_x


def controls(pi_ref: torch.Tensor, correct: torch.Tensor, full: torch.Tensor | None = None, formats: int = 0) -> dict:
    """name -> ``(pi_ref, pi_post, correct)`` for the controls of the module docstring on one reference ``pi_ref
    (N, A)``; ``full``: the untruncated reference, for the latent-optimum control; ``formats``: the first that many
    replies are correct formats (``llm_like``), for the format-collapse row."""
    out = {"identical": (pi_ref, pi_ref, correct)}
    out |= {f"reweight beta={b:g}": (pi_ref, reweight(pi_ref, correct, b), correct) for b in (1.0, 3.0, 10.0)}
    out |= {f"narrow T={t:g}": (pi_ref, with_temperature(pi_ref, t), correct) for t in (0.5, 0.25)}
    out["new capability q=0.3"] = new_capability(pi_ref, correct, 0.3)
    out["new capability q=0.05"] = new_capability(pi_ref, correct, 0.05)
    out["new capability q=0.3, reference 1e-7"] = new_capability(pi_ref, correct, 0.3, eps=1e-7)
    if full is not None and bool(((pi_ref * correct).sum(1) == 0).any()):
        opt = full.double() * correct
        mass = opt.sum(1, keepdim=True)
        # where even the full reference gives the correct replies 0 (a deterministic process), the optimum cannot move
        out["latent optimum"] = (pi_ref, torch.where(mass > 0, opt / mass.clamp_min(1e-300), pi_ref.double()), correct)
    if formats:
        # the blind spot: RL collapses onto the correct format the reference likes least, while the reference still
        # answers correctly in others; the verdict's claim (about the post-RL replies) is true, "unsolvable" is not
        least = pi_ref[:, :formats].argmin(1)
        post = 0.1 * pi_ref.double() * ~correct / (pi_ref.double() * ~correct).sum(1, keepdim=True)
        post[torch.arange(len(pi_ref)), least] = 0.9
        out["format collapse (least likely correct format)"] = (pi_ref, post, correct)
    return out


def llm_like(
    n_pool: int, lo: float, hi: float, formats: int = 4, wrong: int = 20, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A reference shaped like an LLM's on an arithmetic task: per-prompt success ``log-uniform(lo, hi)``, its correct
    mass split over ``formats`` replies ("761", "The answer is 761.", ...) and the rest over ``wrong`` replies, both
    by a flat Dirichlet. Returns ``(pi_ref (n_pool, formats + wrong), correct)``."""
    g = torch.Generator().manual_seed(seed)
    p = torch.exp(
        torch.empty(n_pool, dtype=torch.float64).uniform_(
            torch.log(torch.tensor(lo)).item(), torch.log(torch.tensor(hi)).item(), generator=g
        )
    )
    split = lambda m: (e := -torch.rand(n_pool, m, generator=g, dtype=torch.float64).log()) / e.sum(1, keepdim=True)  # noqa: E731
    pi = torch.cat([p[:, None] * split(formats), (1 - p)[:, None] * split(wrong)], 1)
    correct = torch.zeros_like(pi, dtype=torch.bool)
    correct[:, :formats] = True
    return pi, correct


def sample_run(
    pi_ref: torch.Tensor, pi_post: torch.Tensor, correct: torch.Tensor, n_prompts: int, n: int, g: torch.Generator
) -> dict:
    """What one report sees: ``n_prompts`` prompts drawn from the pool, ``n`` replies per prompt from each policy;
    correct counts and, per prompt, ``log pi_ref - log pi_post`` of each correct post-RL reply (-inf: pi_ref = 0)."""
    idx = torch.randperm(len(pi_ref), generator=g)[:n_prompts]
    r, p, c = pi_ref[idx].double(), pi_post[idx].double(), correct[idx]
    y_ref = torch.multinomial(r, n, replacement=True, generator=g)
    y_post = torch.multinomial(p, n, replacement=True, generator=g)
    ok_ref, ok_post = c.gather(1, y_ref), c.gather(1, y_post)
    lw = r.log().gather(1, y_post) - p.log().gather(1, y_post)
    return {"idx": idx, "c_ref": ok_ref.sum(1), "c_post": ok_post.sum(1), "log_w": [w[m] for w, m in zip(lw, ok_post)]}


def judge_run(run: dict, n: int, ks: list[int], k_verdict: int, pk: PassKConfig) -> dict:
    """The report's verdicts on one run: sharper at ``k_verdict``, wider at ``ks[-1]``, outside support (no chance
    gate: what each rule calls, not whether guessing could explain it)."""
    ref = torch.stack([pass_at_k(n, run["c_ref"], k) for k in ks], 1)
    post = torch.stack([pass_at_k(n, run["c_post"], k) for k in ks], 1)
    j = ks.index(k_verdict) + 1
    cfg = PassKConfig(**{**pk.__dict__, "ks": ks[:j]})
    return {
        "sharper": passk_verdict(ref[:, :j], post[:, :j], cfg)["verdict"].startswith("sharper"),
        "wider": wider_verdict(ref[:, -1], post[:, -1], ks[-1], cfg)["verdict"].startswith("wider"),
        "outside": outside_support(n, run["c_post"], run["c_ref"], run["log_w"], cfg),
    }


def confusion(
    control: tuple, n_prompts: int, n: int, ks: list[int], k_verdict: int, pk: PassKConfig, runs: int, seed: int = 0
) -> dict:
    """Shares of ``runs`` simulated reports called sharper / wider / outside support, the share whose sampled prompts
    hold a truly-outside one, the flagged prompts that are not truly outside (false flags: the target is 0) and the
    share of truly-outside sampled prompts flagged (per-prompt recall)."""
    pi_ref, pi_post, correct = control
    t = outside_support_exact(pi_ref, pi_post, correct, pk.support_k)
    g = torch.Generator().manual_seed(seed)
    sharper = wider = outside = true_runs = false_flags = hits = positives = 0
    for _ in range(runs):
        run = sample_run(pi_ref, pi_post, correct, n_prompts, n, g)
        v = judge_run(run, n, ks, k_verdict, pk)
        tt = t[run["idx"]]
        flagged = torch.zeros(n_prompts, dtype=torch.bool)
        flagged[v["outside"]["flagged"]] = True
        sharper += v["sharper"]
        wider += v["wider"]
        outside += bool(flagged.any())
        true_runs += bool(tt.any())
        false_flags += int((flagged & ~tt).sum())
        hits += int((flagged & tt).sum())
        positives += int(tt.sum())
    return {
        "runs": runs,
        "truly_outside": true_runs / runs,
        "sharper": sharper / runs,
        "wider": wider / runs,
        "outside": outside / runs,
        "false_flags": false_flags,
        "prompt_recall": hits / positives if positives else None,
        "truly_outside_share_of_pool": float(t.double().mean()),
    }
