"""The belief side of the reweighting report (``llm.experiments.reweighting``): is the task's latent linearly readable from the
residual stream at the prompt's last position, before RL and after, against a random-init model of the same
architecture? The toy detector's ladder idea at LLM scale; readability is not use."""

from __future__ import annotations

import torch

from llm.tasks import TaskPrompt


@torch.no_grad()
def last_position_stream(model, tokenizer, texts: list[str], batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Residual stream at the last prompt token for every site of ``probes.activations``: site -> (n, d_model) float32 CPU."""
    from llm.generate import left_padded
    from probes.activations import residual_sites, residual_stream

    sites = residual_sites(model)
    chunks = []
    for s in range(0, len(texts), batch_size):
        ids, mask = left_padded(
            [tokenizer.encode(t, add_special_tokens=False) for t in texts[s : s + batch_size]], tokenizer.pad_token_id
        )
        chunks.append(residual_stream(model, ids, mask, sites)[:, :, -1].float().cpu())
    acts = torch.cat(chunks, dim=1)
    return {site: acts[i] for i, site in enumerate(sites)}


def output_side_sites(sites: list[str]) -> list[str]:
    """The last quarter of the blocks and the final norm: where the residual stream feeds the unembedding."""
    blocks = [s for s in sites if s.startswith("block")]
    return blocks[len(blocks) - max(1, len(blocks) // 4) :] + [s for s in sites if s == "final_norm"]


def probe_groups(prompts: list[TaskPrompt]) -> torch.Tensor:
    """(n,) group ids for the probe's folds: prompts sharing ``TaskPrompt.group`` (the operands that fix the latent)
    share an id; a prompt without one is its own group. Ids count up in order of first appearance, so prompts that are
    all their own groups get ``arange(n)``: the same folds as ungrouped cross-fitting."""
    ids: dict[str, int] = {}
    return torch.tensor(
        [ids.setdefault(p.group if p.group is not None else f"prompt:{p.question}", len(ids)) for p in prompts]
    )


def belief_side(cfg, ref, post, tokenizer, prompts: list[TaskPrompt]) -> dict:
    """Cross-fitted latent probes per site for the reference, the post-RL model and a random-init control. ``cfg`` is the
    report's ``ReweightingConfig`` (its probe_* fields, readable_ratio, score_batch_size and seed)."""
    from transformers import AutoModelForCausalLM

    from llm.generate import chat_prompt
    from probes.linear import fit_probe_report

    texts = [chat_prompt(tokenizer, p.question) for p in prompts]
    y = torch.tensor([float(p.latent) for p in prompts], dtype=torch.float64)
    if y.std() == 0:
        raise ValueError("the probe prompts' latent is constant; nothing to read")
    y = ((y - y.mean()) / y.std())[:, None]
    torch.manual_seed(cfg.seed)
    rand = (
        AutoModelForCausalLM.from_config(ref.config, dtype=next(ref.parameters()).dtype)
        .to(next(ref.parameters()).device)
        .eval()
    )
    acts = {
        name: last_position_stream(m, tokenizer, texts, cfg.score_batch_size)
        for name, m in (("reference", ref), ("post", post), ("random_init", rand))
    }
    del rand
    groups = probe_groups(prompts)
    n_groups = int(groups.max()) + 1
    if n_groups < cfg.probe_folds:
        raise ValueError(
            f"the {len(prompts)} probe prompts form {n_groups} operand groups, fewer than probe_folds={cfg.probe_folds}; "
            "raise probe_n or lower probe_folds"
        )
    out = {
        "n": len(prompts),
        "n_groups": n_groups,
        "target": "latent (z-scored)",
        "alpha": cfg.probe_alpha,
        "folds": cfg.probe_folds,
        "models": {},
    }
    for name in ("reference", "post"):
        # folds keep an operand group whole: a probe must read the latent, not recognise operands it was fitted on
        rep = fit_probe_report(
            acts[name],
            y,
            acts["random_init"],
            alpha=cfg.probe_alpha,
            n_folds=cfg.probe_folds,
            seed=cfg.seed,
            groups=groups,
            concat=False,
        )
        sites = {
            s: {
                "r2": r["test"]["r2"],
                "ratio_to_random_init": r["ratio_to_random_init"],
                "ratio_to_shuffled": r["ratio_to_shuffled"],
            }
            for s, r in rep["sites"].items()
        }
        readable = [s for s, r in sites.items() if r["r2"] > 0 and r["ratio_to_random_init"] <= cfg.readable_ratio]
        out["models"][name] = {
            "sites": sites,
            "best_site": rep["best_site"],
            "best_r2": sites[rep["best_site"]]["r2"],
            "readable_sites": readable,
        }
    names = list(acts["reference"])
    out_sites = output_side_sites(names)
    mean_r2 = {
        m: sum(out["models"][m]["sites"][s]["r2"] for s in out_sites) / len(out_sites) for m in ("reference", "post")
    }
    out["output_side_sites"] = out_sites
    out["output_side_mean_r2"] = mean_r2
    out["readable_before_rl"] = bool(out["models"]["reference"]["readable_sites"])
    out["output_side_r2_gain"] = mean_r2["post"] - mean_r2["reference"]
    # a site whose activations did not move cannot change its read-out (e.g. blocks below a one-layer LoRA)
    out["unchanged_sites"] = [s for s in names if torch.equal(acts["reference"][s], acts["post"][s])]
    return out
