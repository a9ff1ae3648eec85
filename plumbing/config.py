"""The one config parser of every entry point: ``trl.TrlParser`` (``--config file.yaml`` plus flag overrides,
unknown keys an error) whose YAML values are converted like flags and whose YAML paths mean the same from
any working directory.

Types: TRL sets YAML values as argparse defaults, and argparse converts a default only when it is a string:
a YAML ``steps: 2.5`` would reach an ``int`` field as the float 2.5 unchecked, a list element or a choice
would skip its type and its choices, and only by that accident does ``lr: 5e-2`` (a string to YAML, which
wants a dot in a float) become a float. ``ConfigParser`` converts every YAML value with the flag's own type
and checks its choices, so a file and a command line mean the same thing.

Paths: a relative path written in a ``--config`` YAML is relative to the *project root of that file* -- the
nearest folder at or above it holding a ``pyproject.toml`` (this repository's root for everything in
``configs/``), or the YAML's own folder when it lies in no project. So ``question_file:
llm/data/em/first_plot_questions.yaml`` in ``configs/llm/x.yaml`` names the same file whether the command
runs from the repository root, from ``/tmp`` or from a Slurm spool folder. Paths typed on the command line
keep their usual meaning (relative to the working directory), and code defaults are absolute (``llm.data``).
Which values are paths is decided by the key: ``PATH_KEYS`` always; ``MODEL_KEYS`` (a hub id or a local
folder / file) only when the value looks local -- it starts with ``.`` or ``~``, ends with ``.gguf``, or
exists under the anchor -- so ``Qwen/Qwen2.5-0.5B`` stays a hub id. Nested mappings (the sections of
``llm.experiments.base_vs_instruct``) are resolved key by key with the same rule. A loader that reads YAML itself calls
``resolve_config_paths(values, config_anchor(path))``. ``require_file`` is the one error message for an
input that is not there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Mapping

from trl import TrlParser


def _as_flag(value) -> str:
    """``value`` as it would be typed on the command line."""
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


PATH_KEYS = frozenset(
    {
        "adapter_path",
        "aligned_texts",
        "cache_dir",
        "data_dir",
        "dataset_path",
        "directions",
        "judged_files",
        "logging_dir",
        "lora_path",
        "misaligned_texts",
        "offline_weights",
        "openai_cache_path",
        "out",
        "output_dir",
        "probe_files",
        "prompt_file",
        "question_file",
        "target_adapter_path",
        "track_texts",
        # toy: pre-training config and cache, a pre-trained model, the (pre, post) pair of a report
        "pretrain_config",
        "pretrain_dir",
        "pretrained_path",
        "init_from",
        "pre",
        "post",
        # llm.experiments.reweighting: the adapter, the GRPO config that trains it, an eval prompt file
        "post_adapter",
        "grpo_config",
        "eval_file",
    }
)
MODEL_KEYS = frozenset(
    {
        "model_name_or_path",
        "target_model_name_or_path",
        "hf_judge_model",
        "chat_template_from",
        "reference_model",
        "post_model",
    }
)


def config_anchor(config_path: str | Path) -> Path:
    """The folder relative YAML paths are read from: the nearest ancestor of the config holding a
    ``pyproject.toml``, else the config's own folder (absolute)."""
    folder = Path(config_path).expanduser().resolve().parent
    for d in (folder, *folder.parents):
        if (d / "pyproject.toml").is_file():
            return d
    return folder


def _resolve(value: Any, anchor: Path, model: bool) -> Any:
    if isinstance(value, (list, tuple)):
        return type(value)(_resolve(v, anchor, model) for v in value)
    if not isinstance(value, str) or not value:
        return value
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    if model and not (value.startswith(".") or value.endswith(".gguf") or (anchor / p).exists()):
        return value  # a hub id such as Qwen/Qwen2.5-0.5B
    return str(anchor / p)


def resolve_config_paths(values: Mapping[str, Any], anchor: str | Path) -> dict[str, Any]:
    """A copy of ``values`` (one YAML mapping) with every relative path value made absolute under
    ``anchor`` (see the module docstring for which keys are paths); other values are untouched."""
    anchor = Path(anchor)
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, Mapping):
            out[k] = resolve_config_paths(v, anchor)
        elif k in PATH_KEYS or k in MODEL_KEYS:
            out[k] = _resolve(v, anchor, model=k in MODEL_KEYS)
        else:
            out[k] = v
    return out


def require_file(path: str | Path | None, name: str, what: str, *, folder: bool = False) -> Path:
    """``Path(path)`` if it exists, else ``FileNotFoundError`` naming the setting, the path as resolved
    and what to pass. ``folder=True`` asks for a directory."""
    flag = name if name.startswith("--") else f"--{name}"
    if path is None or str(path) == "":
        raise FileNotFoundError(f"{name} is not set; pass {flag} <{what}>")
    p = Path(path).expanduser()
    ok = p.is_dir() if folder else p.is_file()
    if not ok:
        where = "" if p.is_absolute() else f" (relative to the working directory {Path.cwd()})"
        raise FileNotFoundError(
            f"{name}: {p}{where} is not {'a folder' if folder else 'a file'}; pass {flag} <{what}>. "
            "Relative paths in a --config YAML are read from the project root that holds the YAML."
        )
    return p


# What the last ``ConfigParser`` parse of this process read: the tokens typed and the --config file's project
# root (None without one). ``plumbing.runs.removal_refusal`` reads it: a folder named only by a config file may
# not be emptied by --overwrite when it lies outside both the working directory and that config's project.
_LAST_PARSE: dict[str, Any] = {"args": None, "anchor": None}


def last_parse() -> dict[str, Any]:
    """``{"args": [typed tokens] | None, "anchor": Path | None}`` of this process's last ``ConfigParser`` parse."""
    return dict(_LAST_PARSE)


class ConfigParser(TrlParser):
    """``trl.TrlParser`` whose ``--config`` YAML values are path-anchored and type-converted as the module
    docstring says; a missing config file is named before anything else happens."""

    _anchor: Path | None = None

    def parse_args_and_config(self, args=None, *a, **kw):
        args = list(args) if args is not None else sys.argv[1:]
        self._anchor = None
        if "--config" in args:
            i = args.index("--config")
            if i + 1 >= len(args):
                raise ValueError("--config needs a YAML file: --config configs/<side>/<name>.yaml")
            require_file(args[i + 1], "--config", "a YAML config (see configs/)")
            self._anchor = config_anchor(args[i + 1])
        _LAST_PARSE.update(args=list(args), anchor=self._anchor)
        return super().parse_args_and_config(args, *a, **kw)

    def set_defaults_with_config(self, **kwargs) -> list[str]:
        if self._anchor is not None:
            kwargs = resolve_config_paths(kwargs, self._anchor)
        actions = {a.dest: a for a in self._actions}
        converted = {k: self._convert(actions[k], k, v) if k in actions else v for k, v in kwargs.items()}
        return super().set_defaults_with_config(**converted)

    @staticmethod
    def _convert(action: argparse.Action, key: str, value):
        if value is None or action.type is None:  # None: an optional field left unset
            return value
        many = action.nargs in ("+", "*")
        if many and not isinstance(value, list):
            raise ValueError(f"config key {key!r}: expected a list, got {value!r}; write it as [a, b, ...]")
        items = value if many else [value]
        try:
            out = [action.type(_as_flag(v)) for v in items]
        except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
            kind = getattr(action.type, "__name__", str(action.type))
            raise ValueError(
                f"config key {key!r}: {value!r} is not a valid {kind} ({err}); write it as you would "
                f"after --{key} on the command line"
            ) from None
        if action.choices is not None:
            bad = [v for v in out if v not in action.choices]
            if bad:
                raise ValueError(f"config key {key!r}: {bad[0]!r} is not one of {list(action.choices)}")
        return out if many else out[0]
