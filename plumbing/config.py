"""The one config parser of every entry point: ``trl.TrlParser`` (``--config file.yaml`` plus flag overrides,
unknown keys an error) whose YAML values go through the same type conversion as flags.

TRL sets YAML values as argparse defaults, and argparse converts a default only when it is a string: a YAML
``steps: 2.5`` would reach an ``int`` field as the float 2.5 unchecked, a list element or a choice would skip its
type and its choices, and only by that accident does ``lr: 5e-2`` (a string to YAML, which wants a dot in a
float) become a float. ``ConfigParser`` converts every YAML value with the flag's own type and checks its
choices, so a file and a command line mean the same thing.
"""

from __future__ import annotations

import argparse
import json

from trl import TrlParser


def _as_flag(value) -> str:
    """``value`` as it would be typed on the command line."""
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class ConfigParser(TrlParser):
    """``TrlParser`` whose YAML values are converted like flags (see the module docstring)."""

    def set_defaults_with_config(self, **kwargs) -> list[str]:
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
            raise ValueError(f"config key {key!r}: {value!r} is not a valid {kind} ({err}); write it as you would "
                             f"after --{key} on the command line") from None
        if action.choices is not None:
            bad = [v for v in out if v not in action.choices]
            if bad:
                raise ValueError(f"config key {key!r}: {bad[0]!r} is not one of {list(action.choices)}")
        return out if many else out[0]
