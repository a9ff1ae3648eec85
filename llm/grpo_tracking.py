"""The misalignment direction and factor probes tracked over GRPO training (``llm.grpo``): a fixed set of labelled
replies re-read every ``track_every`` steps at the tracked site, their mean projection on the direction and each
probe's read-out logged beside the reward -- how the representation of the alignment factor moves under RL."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback

from llm.data import ALIGNED_TEXTS, MISALIGNED_TEXTS


@dataclass
class TrackConfig:
    """What to read from the residual stream during training."""

    track_every: int = field(default=0, metadata={"help": "read activations every k steps (0 = off)"})
    track_site: str = field(default="block15", metadata={"help": "residual site read (block<i>)"})
    directions: str | None = field(
        default=None, metadata={"help": "llm.steer directions file (the track_site row is used)"}
    )
    probe_files: list[str] = field(default_factory=list, metadata={"help": "probes.io files read at their own site"})
    track_texts: list[str] = field(
        default_factory=lambda: [str(ALIGNED_TEXTS), str(MISALIGNED_TEXTS)],
        metadata={"help": "aligned and misaligned reply CSVs of the fixed tracking set"},
    )
    track_n_per_class: int = field(default=8, metadata={"help": "tracked replies per class"})

    def __post_init__(self):
        if self.track_every < 0:
            raise ValueError("track_every must be >= 0")
        if self.track_every and not self.directions and not self.probe_files:
            raise ValueError("track_every > 0 needs `directions` and/or `probe_files` to read")
        if len(self.track_texts) != 2:
            raise ValueError("track_texts must be [aligned_csv, misaligned_csv]")


class ActivationTracker(TrainerCallback):
    """Reads the residual stream on a fixed set of labelled replies at step 0 and every ``every`` steps and
    records, per class (aligned / misaligned), the mean projection on ``direction`` (d_model,) at ``site``
    and the mean read-out of each probe (at the probe's own site). Rows go to ``self.history`` and (main
    process) to ``<output_dir>/tracking.jsonl``."""

    def __init__(
        self,
        tokenizer,
        texts,
        every: int,
        site: str | None = None,
        direction: torch.Tensor | None = None,
        probes: dict | None = None,
        batch_size: int = 8,
        max_answer_tokens: int = 64,
    ):
        if every < 1:
            raise ValueError("every must be >= 1")
        self.tokenizer, self.texts, self.every = tokenizer, texts, every
        self.site, self.direction, self.probes = site, direction, probes or {}
        self.batch_size, self.max_answer_tokens = batch_size, max_answer_tokens
        self.history: list[dict] = []

    def _read(self, args, state, model) -> None:
        from llm.directions import answer_activations, projections

        model = getattr(model, "module", model)
        sites = list(
            dict.fromkeys(([self.site] if self.direction is not None else []) + [p.site for p in self.probes.values()])
        )
        was_training = model.training
        model.eval()
        try:
            acts = answer_activations(
                model,
                self.tokenizer,
                self.texts.questions,
                self.texts.answers,
                sites,
                self.batch_size,
                self.max_answer_tokens,
            )
        finally:
            model.train(was_training)
        labels = self.texts.labels
        row = {"step": state.global_step}
        if self.direction is not None:
            proj = projections(acts[sites.index(self.site)].double(), self.direction.double().cpu())
            row["projection_aligned"], row["projection_misaligned"] = (
                float(proj[labels == 0].mean()),
                float(proj[labels == 1].mean()),
            )
        for name, probe in self.probes.items():
            y = probe.predict(acts[sites.index(probe.site)].double())
            row[f"{name}_aligned"], row[f"{name}_misaligned"] = (
                y[labels == 0].mean(0).tolist(),
                y[labels == 1].mean(0).tolist(),
            )
        self.history.append(row)
        if state.is_world_process_zero:
            out = Path(args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            with (out / "tracking.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        path = Path(args.output_dir) / "tracking.jsonl"
        if state.is_world_process_zero and path.is_file():
            # rows from this step on belong to an earlier run or to the abandoned part of a resumed one
            keep = [
                line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < state.global_step
            ]
            path.write_text("".join(line + "\n" for line in keep))
        self._read(args, state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self._read(args, state, model)


def build_tracker(cfg: TrackConfig, model, tokenizer, seed: int = 0) -> ActivationTracker | None:
    """The ``ActivationTracker`` ``cfg`` describes (files checked against ``model``), or None when off."""
    if not cfg.track_every:
        return None
    from llm.directions import load_directions, load_labelled_texts
    from probes.io import load_probe

    texts = load_labelled_texts(cfg.track_texts[0], cfg.track_texts[1], cfg.track_n_per_class, seed)
    direction = None
    if cfg.directions:
        dirs, meta = load_directions(cfg.directions, model=model)
        if cfg.track_site not in meta["sites"]:
            raise ValueError(f"track_site {cfg.track_site!r} is not in {cfg.directions} (sites {meta['sites']})")
        direction = dirs[meta["sites"].index(cfg.track_site)]
    probes = {
        Path(f).with_suffix("").name if f.endswith(".json") else Path(f).name: load_probe(f, model=model)
        for f in cfg.probe_files
    }
    return ActivationTracker(tokenizer, texts, cfg.track_every, cfg.track_site, direction, probes)
