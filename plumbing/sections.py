"""Sectioned YAML configs and their command-line overrides: ``--<section>.<field> value(s)``.

Entry points whose YAML holds one mapping per concern (``base:``, ``sft:``, ``eval:`` ...) parse each section
strictly into its dataclass (``parse_section``). ``add_section_flags`` lists every section's fields on a
``plumbing.config.ConfigParser`` as ``--<section>.<field>`` (so ``--help`` shows them) and
``parse_sectioned_args`` parses a command line into the parser's dataclasses (the YAML's top-level keys and
their flags) and the section overrides; ``split_overrides`` does the latter alone for a plain parser. ``coerce``
turns an override's strings into the field's type, so the section parses as if the YAML had said it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Iterable, Mapping

import yaml

from plumbing.config import config_anchor, resolve_config_paths


def coerce(cls, name: str, values: list[str], flag: str | None = None):
    """A command-line value list as the dataclass field's type: a list for list fields, else one value.
    ``flag`` (e.g. ``base.model_name_or_path``) names the option in errors."""
    flag = flag or name
    hints = typing.get_type_hints(cls)
    if name not in hints:
        raise ValueError(f"--{flag}: {cls.__name__} has no field {name!r}")
    t = hints[name]
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        t = next(a for a in typing.get_args(t) if a is not type(None))  # X | None -> X
    is_list = typing.get_origin(t) is list
    scalar = typing.get_args(t)[0] if is_list else t

    def one(v: str):
        if scalar is bool:
            if v.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--{flag} takes true or false, got {v!r}")
            return v.lower() in ("true", "1")
        if scalar in (int, float):
            return scalar(v)
        return None if v.lower() in ("none", "null") else v

    vals = [one(v) for v in values]
    if is_list:
        return vals
    if len(vals) != 1:
        raise ValueError(f"--{flag} takes one value, got {values}")
    return vals[0]


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, dict[str, list[str]]]]:
    """``(top-level argv, {section: {field: [values]}})``: ``--section.field v1 v2`` go to the second."""
    top, sections, i = [], {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "." in arg.split("=")[0]:
            key, _, inline = arg[2:].partition("=")
            section, _, name = key.partition(".")
            values = [inline] if inline else []
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
            sections.setdefault(section, {})[name] = values
        else:
            top.append(arg)
            i += 1
    return top, sections


def read_sectioned_yaml(
    path: str | Path,
    sections: Mapping[str, type],
    top_keys: Iterable[str],
    overrides: dict[str, dict[str, list[str]]] | None = None,
) -> dict:
    """The YAML at ``path`` as a dict: every key of ``sections`` present (each a mapping for its dataclass), any
    of ``top_keys`` besides, nothing else; relative paths anchored at the project root (``plumbing.config``); the
    ``--section.field`` ``overrides`` (``split_overrides``) coerced to the fields' types and applied."""
    raw = yaml.safe_load(Path(path).read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a YAML mapping")
    raw = resolve_config_paths(raw, config_anchor(path))  # YAML paths mean the same from any working directory
    allowed = set(sections) | set(top_keys)
    unknown = set(raw) - allowed
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    missing = set(sections) - set(raw)
    if missing:
        raise ValueError(f"{path}: missing sections {sorted(missing)}")
    for section, values in (overrides or {}).items():
        if section not in sections:
            raise ValueError(f"--{section}.*: no section {section!r}; sections: {sorted(sections)}")
        raw[section] = {
            **(raw[section] or {}),
            **{name: coerce(sections[section], name, vals, f"{section}.{name}") for name, vals in values.items()},
        }
    return raw


def parse_section(name: str, cls, values: Mapping):
    """``cls`` from the mapping ``values`` of section ``name``; an unknown key or a bad value is an error that
    names the section."""
    from transformers import HfArgumentParser

    if not isinstance(values, Mapping):
        raise ValueError(f"section {name!r} must be a mapping, got {type(values).__name__}")
    try:
        (obj,) = HfArgumentParser(cls).parse_dict(dict(values), allow_extra_keys=False)
    except (ValueError, TypeError) as e:
        raise ValueError(f"section {name!r}: {e}") from None
    return obj


def add_section_flags(
    parser: argparse.ArgumentParser, sections: Mapping[str, type], skip: Mapping[str, Iterable[str]] | None = None
) -> None:
    """Every section's fields as ``--<section>.<field> [V ...]`` options (none for the fields in ``skip``, which
    the entry point sets itself), one argument group per section with the fields' one-line docs, so ``--help``
    lists what the YAML's sections take. Their values stay strings until ``read_sectioned_yaml`` coerces them
    (``parse_sectioned_args`` collects them); no value is an empty list."""
    parser.usage = (
        f"%(prog)s --config YAML [--<option> V] [--<section>.<field> V ...]  (sections: {', '.join(sections)})"
    )
    for section, cls in sections.items():
        group = parser.add_argument_group(f"section {section} ({cls.__name__}; YAML key {section}:)")
        for f in dataclasses.fields(cls):
            if f.init and f.name not in set((skip or {}).get(section, ())):
                group.add_argument(
                    f"--{section}.{f.name}",
                    dest=f"{section}.{f.name}",
                    nargs="*",
                    metavar="V",
                    default=argparse.SUPPRESS,
                    help=f.metadata.get("help", ""),
                )


def parse_sectioned_args(parser, argv: list[str] | None = None) -> tuple[tuple, dict[str, dict[str, list[str]]], str]:
    """``(the parser's dataclasses, {section: {field: [values]}}, the --config path)`` of ``argv``: the YAML's
    top-level keys and their flags go into the dataclasses (``parser`` is a ``plumbing.config.ConfigParser``
    with ``add_section_flags``), the ``--<section>.<field>`` flags into the overrides for ``read_sectioned_yaml``,
    which reads the YAML's sections. An unknown flag is an error; so is a missing ``--config``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    *parsed, _sections, unknown = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if "--config" not in argv:
        parser.error("--config is required: a YAML with the sections the module docstring describes")
    n = len(parser.dataclass_types)
    flags = vars(parsed[n]) if len(parsed) > n else {}
    overrides: dict[str, dict[str, list[str]]] = {}
    for key, values in flags.items():
        section, _, name = key.partition(".")
        overrides.setdefault(section, {})[name] = values
    return tuple(parsed[:n]), overrides, argv[argv.index("--config") + 1]
