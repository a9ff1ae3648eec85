"""The emergent-misalignment chain's grid (``toy.experiments.em_chain``): its config (``EMChainConfig``), the cells
(world, knob, switch probability, seed) and the world each cell pre-trains on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from plumbing.grid import parse_shard
from toy.alignment import (
    knob_measures,
    persona_world,
    slice_tag_marginals,
    subset_measures,
    subset_slices,
    subset_tag_mass,
    subset_world,
    tagless_world,
    visit_world,
)
from toy.config import JsonDict
from toy.em_dose import check_claims
from toy.processes import Process, make_process
from toy.safety_stages import SAFETY

# pre-training worlds without a shared alignment factor (toy.alignment.tagless_world, visit_world)
BASELINES = ("tagless", "visit")


@dataclass
class EMChainConfig:
    """The world grid, the safety stages, the narrow fine-tune and the declared thresholds (pre-training:
    ``toy.config.TrainConfig``; fine-tuning reuses its batch size, optimizer and schedule)."""

    capability: JsonDict = field(
        default_factory=lambda: JsonDict({"name": "mess3", "x": 0.05, "a": 0.85}),
        metadata={"help": "Capability process spec (toy.processes.make_process); JSON on the command line."},
    )
    slices: list[int] = field(
        default_factory=lambda: [0, 1, 2], metadata={"help": "Slice id of each capability token."}
    )
    couplings: list[float] = field(
        default_factory=lambda: [0.0, 1.0], metadata={"help": "Knob values: 1 shared persona, 0 a tag per slice."}
    )
    switch_probs: list[float] = field(
        default_factory=lambda: [0.05], metadata={"help": "Tag flip probabilities per step, each in (0, 0.5)."}
    )
    tag_noise: float = field(default=0.1, metadata={"help": "Probability that a copy shows the other tag."})
    safety: list[str] = field(
        default_factory=lambda: list(SAFETY), metadata={"help": "Safety stages to run: none, sft, grpo."}
    )
    n_seeds: int = field(default=3, metadata={"help": "Seeds per (knob, switch_prob) of each world."})
    baseline_worlds: list[str] = field(
        default_factory=list,
        metadata={
            "help": (
                "Pre-training worlds without a shared alignment factor, each a grid row beside the persona couplings: "
                "tagless (no alignment tag at all), visit (a tag redrawn at every slice visit: no latent across slices)."
            )
        },
    )
    subset_correlations: list[float] = field(
        default_factory=list,
        metadata={
            "help": (
                "Capability-subset axis (empty: off): subset-tag correlations of toy.alignment.subset_world cells, one tag and "
                "max(slices) + 1 capability subsets; subset narrow_slice is the one tied to the tag."
            )
        },
    )
    shard: str = field(
        default="0/1", metadata={"help": "i/N: run every N-th cell starting at i (N processes split the grid)."}
    )
    summarize_only: bool = field(
        default=False,
        metadata={"help": "Run no cell: rebuild metrics.json, summary.md and the plots from the cells present."},
    )
    wait_timeout_s: float = field(
        default=3600.0,
        metadata={"help": "Under a launcher: seconds rank 0 waits for the other ranks' cells before failing."},
    )
    context_length: int = field(default=10, metadata={"help": "Tokens per window."})
    prompt_length: int = field(default=5, metadata={"help": "Prompt tokens (aligned); the rest is the completion."})
    narrow_slice: int = field(default=0, metadata={"help": "Slice of the narrow fine-tune."})
    sft_steps: int = field(default=100, metadata={"help": "Steps of the SFT safety stage."})
    sft_lr: float = field(default=1e-3, metadata={"help": "Peak learning rate of the SFT safety stage."})
    grpo_steps: int = field(default=30, metadata={"help": "Steps of the GRPO safety stage."})
    grpo_lr: float = field(default=1e-3, metadata={"help": "Learning rate of the GRPO safety stage."})
    grpo_batch: int = field(
        default=32, metadata={"help": "GRPO completions per step (a multiple of grpo_generations)."}
    )
    grpo_generations: int = field(default=8, metadata={"help": "GRPO completions per prompt."})
    grpo_completion: int = field(default=3, metadata={"help": "GRPO completion tokens."})
    grpo_beta: float = field(default=0.04, metadata={"help": "GRPO KL coefficient to the pre-trained policy."})
    finetune_steps: int = field(default=100, metadata={"help": "Steps of the full and the LoRA narrow fine-tune."})
    finetune_lr: float = field(default=1e-3, metadata={"help": "Peak learning rate of full fine-tuning."})
    lora_lr: float = field(default=1e-2, metadata={"help": "Peak learning rate of the rank-1 LoRA."})
    lora_layer: int = field(
        default=1, metadata={"help": "Block of the LoRA's mlp.c_proj, of the steering vector and of the probes."}
    )
    lora_alpha: float = field(default=1.0, metadata={"help": "LoRA alpha."})
    steer_scale: float = field(default=1.0, metadata={"help": "Multiple of the mean difference added."})
    trajectory_every: int = field(
        default=0,
        metadata={
            "help": (
                "Steps between rate measurements along the full and LoRA narrow fine-tunes (0: endpoints only). With "
                "trajectories, transfer is also read at the matched in-slice shifts `shifts`."
            )
        },
    )
    shifts: list[float] = field(
        default_factory=lambda: [0.25, 0.5, 0.75],
        metadata={
            "help": (
                "Matched in-slice shifts (share of the room 1 - rate before that the narrow rate rose) where transfer is read."
            )
        },
    )
    steer_scales: list[float] = field(
        default_factory=list,
        metadata={
            "help": ("The steering vector's dose axis: multiples of the mean difference (empty: steer_scale only).")
        },
    )
    controls: bool = field(
        default=False,
        metadata={
            "help": (
                "Two more full fine-tunes of the stage-none model: 'replicate' (other data: the null of a paired difference) "
                "and 'taught' (every completion token in the loss, the out-of-slice ones taught aligned: cannot be broad)."
            )
        },
    )
    claims: JsonDict = field(
        default_factory=JsonDict,
        metadata={
            "help": (
                "Pre-registered rules (toy.em_dose): name -> {test, world, stage, method, shift, supported, contradicted, ...}."
            )
        },
    )
    match_alignment: float = field(
        default=0.05,
        metadata={"help": ("Declared: SFT and GRPO are matched when their aligned rates differ by at most this ...")},
    )
    match_drift_ratio: float = field(
        default=2.0,
        metadata={
            "help": ("... and their capability KLs to the pre-trained model are within this factor of each other.")
        },
    )
    eval_prompts: int = field(default=1000, metadata={"help": "Aligned prompts of the rates."})
    probe_sequences: int = field(
        default=300, metadata={"help": "Windows for the alignment probes (each of fit / test)."}
    )
    probe_alpha: float = field(default=1e-2, metadata={"help": "Ridge strength of the probes."})
    knob_windows: int = field(default=2000, metadata={"help": "Windows of the exact knob measures."})
    broad_transfer: float = field(
        default=0.5, metadata={"help": "Declared: transfer >= this (and effect >= em_effect) is broad."}
    )
    narrow_transfer: float = field(default=0.2, metadata={"help": "Declared: transfer <= this stays narrow."})
    em_effect: float = field(default=0.02, metadata={"help": "Declared: the smallest broad effect that counts as EM."})

    def __post_init__(self):
        self.capability = dict(JsonDict(self.capability))
        self.claims = dict(JsonDict(self.claims))
        check_claims(self.claims)
        if any(b not in BASELINES for b in self.baseline_worlds):
            raise ValueError(f"baseline_worlds must list some of {BASELINES}, got {self.baseline_worlds}")
        if (
            any(not 0 < u < 1 for u in self.shifts)
            or self.trajectory_every < 0
            or any(x < 0 for x in self.steer_scales)
        ):
            raise ValueError(
                f"need shifts in (0, 1), trajectory_every >= 0 and steer_scales >= 0; got {self.shifts}, "
                f"{self.trajectory_every}, {self.steer_scales}"
            )
        if "name" not in self.capability:
            raise ValueError("capability must be a process spec with a 'name' key")
        knobs = [*self.couplings, *self.subset_correlations]
        if (
            not (knobs or self.baseline_worlds)
            or not self.switch_probs
            or any(not 0 <= c <= 1 for c in knobs)
            or any(not 0 < s < 0.5 for s in self.switch_probs)
        ):
            raise ValueError(
                f"need couplings and subset_correlations in [0, 1], not all of them and baseline_worlds empty, and switch_probs in (0, 0.5); got "
                f"{self.couplings}, {self.subset_correlations}, {self.switch_probs}"
            )
        if not self.safety or any(s not in SAFETY for s in self.safety):
            raise ValueError(f"safety must list some of {SAFETY}, got {self.safety}")
        if self.narrow_slice not in self.slices:
            raise ValueError(f"narrow_slice={self.narrow_slice} is not one of the slices {sorted(set(self.slices))}")
        if (
            not 1 <= self.prompt_length < self.context_length
            or self.prompt_length + self.grpo_completion > self.context_length
        ):
            raise ValueError(
                f"need 1 <= prompt_length < context_length and prompt_length + grpo_completion <= context_length "
                f"(the model's n_positions); got {self.prompt_length}, {self.grpo_completion}, {self.context_length}"
            )
        parse_shard(self.shard)
        if self.n_seeds < 1 or self.finetune_steps < 1 or self.sft_steps < 1 or self.grpo_steps < 1:
            raise ValueError("need n_seeds, finetune_steps, sft_steps and grpo_steps >= 1")


# --------------------------------------------------------------------------- cells and their worlds


@dataclass(frozen=True)
class Cell:
    """One grid cell: its world (``persona``: knob = coupling; ``subsets``: knob = subset-tag correlation;
    ``tagless`` / ``visit``: no knob, 0), switch probability (0 for ``tagless``, which has no tag) and seed index
    ``k``."""

    world: str
    knob: float
    switch_prob: float
    k: int

    @property
    def name(self) -> str:
        if self.world in BASELINES:
            return f"{self.world}_switch_{self.switch_prob}_seed_{self.k}"
        return f"{'coupling' if self.world == 'persona' else 'subsets'}_{self.knob}_switch_{self.switch_prob}_seed_{self.k}"


def grid(cfg: EMChainConfig) -> list[Cell]:
    """Every cell, persona cells first (their names are the ones earlier runs wrote), then the subsets and the
    baseline worlds (``tagless`` once: it has no tag to switch)."""
    knobbed = [
        Cell(world, x, s, k)
        for world, xs in (("persona", cfg.couplings), ("subsets", cfg.subset_correlations))
        for x in xs
        for s in cfg.switch_probs
        for k in range(cfg.n_seeds)
    ]
    return knobbed + [
        Cell(world, 0.0, s, k)
        for world in cfg.baseline_worlds
        for s in ([0.0] if world == "tagless" else cfg.switch_probs)
        for k in range(cfg.n_seeds)
    ]


@dataclass(frozen=True)
class World:
    """A cell's process, the slice of each of its capability tokens, the probe targets ``(process, beliefs) ->
    (..., K)`` and the exact knob measures ``(process, n_windows, length, seed) -> dict`` (both ``None`` for the
    baseline worlds: no per-slice latent to probe, no knob)."""

    process: Process
    slices: list[int]
    targets: Callable | None
    measures: Callable | None


def world_id(world: str, knob: float) -> str:
    """The name rules and tables use for a world: ``tagless``, ``visit``, ``persona@1.0``, ``subsets@0.5``."""
    return world if world in BASELINES else f"{world}@{knob}"


def make_world(cfg: EMChainConfig, cell: Cell) -> World:
    capability = make_process(cfg.capability["name"], **{k: v for k, v in cfg.capability.items() if k != "name"})
    if cell.world == "persona":
        return World(
            persona_world(capability, cfg.slices, cell.knob, cell.switch_prob, cfg.tag_noise),
            list(cfg.slices),
            slice_tag_marginals,
            knob_measures,
        )
    if cell.world == "tagless":
        return World(tagless_world(capability), list(cfg.slices), None, None)
    if cell.world == "visit":
        return World(visit_world(capability, cfg.slices, cell.switch_prob, cfg.tag_noise), list(cfg.slices), None, None)
    p = subset_world(
        capability, max(cfg.slices) + 1, cell.knob, cell.switch_prob, cfg.tag_noise, target=cfg.narrow_slice
    )
    return World(p, subset_slices(p), subset_tag_mass, subset_measures)
